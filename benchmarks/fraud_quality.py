"""Fraud model quality on real and simulated data, Keel's model against the plain alternatives.

1. ULB card data, time split of the dev file: train on the earlier 80%, test on the later 20%. Keel's model
   (``keel train fraud`` recipe) against scikit-learn's HistGradientBoostingClassifier with default settings
   trained on the same rows (the ``baseline`` of ``keel eval fraud``), over several seeds.
2. Simulator, compromised-card scenario: the per-card sequence model (GRU over the card's last 16
   transactions + velocity features) against the per-transaction model (same features, no sequence), trained on
   the earlier 75% of the days; scored on the later days' legit transactions and scenario-3 frauds.

    keel bench fraud_quality                    # both parts (several minutes on 2 cores)
    keel bench fraud_quality --part ulb --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

METRICS = ("roc_auc", "pr_auc", "recall_at_fpr_0_3pct")


def _mean_spread(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def ulb_part(dev: Path, seeds: list[int], work: Path) -> list[dict]:
    from apps.fraud.data import load_ulb, time_split
    from apps.fraud.evaluate import evaluate
    from apps.fraud.train import FraudTrainConfig, main
    from core.registry import ModelRegistry

    later = work / "ulb_later20.csv"
    time_split(load_ulb(dev), 0.8)[1].to_csv(later, index=False)
    registry = ModelRegistry(work / "registry")
    runs = []
    for seed in seeds:
        version = main(
            FraudTrainConfig(data_path=str(dev), train_frac=0.8, seed=seed, registry_root=str(registry.root))
        )
        runs.append(evaluate(version.ref, later, registry=registry))
        print(runs[-1], flush=True)
    keel = {k: _mean_spread([r["metrics"][k] for r in runs]) for k in METRICS}
    base = {k: _mean_spread([r["baseline"][k] for r in runs]) for k in METRICS}
    n = runs[0]["n"]
    return [
        {"data": f"ULB later 20% (n={n})", "model": f"Keel ({len(seeds)} seeds)", **keel},
        {"data": f"ULB later 20% (n={n})", "model": "HistGradientBoosting (default)", **base},
    ]


def simulator_part(*, customers: int, days: int, members: int, epochs: int, work: Path) -> list[dict]:
    import torch

    from apps.fraud.data import SimulatorConfig, simulate_transactions
    from apps.fraud.evaluate import fraud_metrics
    from apps.fraud.features import FraudFeatureBuilder
    from apps.fraud.model import load_predictor
    from apps.fraud.train import FraudTrainConfig, main
    from core.registry import ModelRegistry

    sim = dict(sim_customers=customers, sim_terminals=2 * customers, sim_days=days, seed=0)
    frame = simulate_transactions(SimulatorConfig(n_customers=customers, n_terminals=2 * customers, n_days=days))
    rows = frame[["tx_id", "ts", "card_id", "terminal_id", "amount", "label"]].to_dict("records")
    dense, seq, lengths = FraudFeatureBuilder(history=16).transform(rows)
    test = np.flatnonzero(frame["ts"].to_numpy() >= frame["ts"].quantile(0.75))
    keep = test[np.isin(frame["scenario"].to_numpy()[test], (0, 3))]
    registry = ModelRegistry(work / "registry")
    out = []
    for name, history in (("per-transaction (no sequence)", 0), ("per-card sequence (GRU, N=16)", 16)):
        cfg = FraudTrainConfig(
            source="simulator",
            history=history,
            train_frac=0.75,
            members=members,
            epochs=epochs,
            registry_root=str(registry.root),
            name=f"sim-h{history}",
            **sim,
        )
        predictor = load_predictor(*registry.load(main(cfg).ref))
        with torch.no_grad():
            z = predictor.logits(
                torch.from_numpy(dense[keep]),
                torch.from_numpy(seq[keep, :, :]) if history else None,
                torch.from_numpy(lengths[keep]) if history else None,
            ).numpy()
        labels = frame["label"].to_numpy()[keep]
        out.append(
            {
                "data": f"simulator, scenario 3 (n={len(keep)}, frauds={int(labels.sum())})",
                "model": name,
                **{k: f"{v:.4f}" for k, v in fraud_metrics(labels, z).items()},
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "ulb", "simulator"), default="all")
    ap.add_argument("--data", type=Path, help="ULB dev CSV (default: <data dir>/fraud/creditcard_ulb_sample_dev.csv)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--customers", type=int, default=500)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--members", type=int, default=2, help="networks per simulator model")
    ap.add_argument("--epochs", type=int, default=15, help="epochs per simulator model")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keel-fraud-quality-"))
    rows = []
    if args.part in ("all", "ulb"):
        from core.config import data_dir

        dev = args.data or (data_dir() or Path("../shared/data")) / "fraud" / "creditcard_ulb_sample_dev.csv"
        rows += ulb_part(dev, [int(s) for s in args.seeds.split(",")], work)
    if args.part in ("all", "simulator"):
        rows += simulator_part(
            customers=args.customers, days=args.days, members=args.members, epochs=args.epochs, work=work
        )
    print_table("Fraud quality (ROC-AUC, PR-AUC, recall at 0.3% FPR)", rows)
    write_json("fraud_quality", {"rows": rows, "args": vars(args) | {"data": str(args.data)}})


if __name__ == "__main__":
    main()
