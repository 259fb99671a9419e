"""Medical edge export: accuracy, calibration and CPU latency of int8 / pruned / ONNX Runtime variants.

For a fine-tuned medical model (``keel train medical``) every variant of :mod:`apps.medical.edge` is built,
exported (ONNX or TorchScript, parity-checked), loaded back in :class:`core.lite.LiteModel`, recalibrated on the
model's own held-out training images, scored on the dev ``val`` split and on val resampled to the official test
split's 62.5% prevalence, timed at batch 1 and 16 on this CPU, and registered as ``medical-edge`` (parent: the model).

    keel bench medical_edge --registry /path/to/registry --model medical@1 --threads 1
    keel bench medical_edge                      # medical@production of $KEEL_HOME/registry

Latency: the forward of a (B, 1, 28, 28) batch, upsampling included; median (and min) of ``--repeats`` runs after
two warm-up runs, the variants timed in turn (interleaved, so load from other jobs hits them alike), ``--threads``
intra-op threads. ``exported`` times the registered file on its runtime, ``eager``
the PyTorch module it came from.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def latencies(modules: dict[str, Any], example: Any, *, repeats: int) -> dict[str, dict[str, float]]:
    """Forward ms per module at batch 1 and 16: median and min of ``repeats`` runs after two warm-up runs.

    The runs are interleaved (one call of each module in turn, ``repeats`` rounds), so load from other jobs on a
    shared machine falls on every module alike instead of on whichever happened to be timed during a burst.
    """
    import statistics
    import time

    import torch

    times: dict[tuple[str, int], list[float]] = {(name, bs): [] for name in modules for bs in (1, 16)}
    with torch.inference_mode():
        for bs in (1, 16):
            x = example[:bs].contiguous()
            for module in modules.values():
                module.eval()
                for _ in range(2):
                    module(x)
            for _ in range(repeats):
                for name, module in modules.items():
                    t0 = time.perf_counter()
                    module(x)
                    times[(name, bs)].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, dict[str, float]] = {name: {} for name in modules}
    for (name, bs), ts in times.items():
        out[name][f"b{bs} median ms"] = statistics.median(ts)
        out[name][f"b{bs} min ms"] = min(ts)
    return out


def params_of(module: Any) -> int:
    from core.compression.report import count_parameters

    return count_parameters(module)[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--registry", type=Path, default=None, help="registry folder (default: $KEEL_HOME/registry)")
    ap.add_argument("--model", default="medical@production")
    ap.add_argument("--variants", default="", help="comma-separated (default: all of apps.medical.edge.VARIANTS)")
    ap.add_argument("--prune-rate", type=float, default=0.3)
    ap.add_argument("--prune-metric", default="l1")
    ap.add_argument("--prune-round-to", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-register", action="store_true")
    ap.add_argument("--out", default="medical_edge")
    args = ap.parse_args(argv)

    import dataclasses

    import torch

    from apps.medical.data import load_split, resample_prevalence
    from apps.medical.edge import VARIANTS, EdgeConfig, build_variants, register_variant
    from apps.medical.evaluate import predictor_metrics
    from apps.medical.model import load_predictor
    from apps.medical.train import MedicalTrainConfig
    from core.config import keel_home
    from core.registry import ModelRegistry

    torch.set_num_threads(args.threads)
    registry = ModelRegistry(args.registry or keel_home() / "registry")
    version, state = registry.load(args.model)
    recipe = MedicalTrainConfig(**{**version.config["recipe"], "registry_root": None})
    variants = tuple(v for v in args.variants.split(",") if v) or VARIANTS
    cfg = EdgeConfig(
        variants=variants,
        prune_rate=args.prune_rate,
        prune_metric=args.prune_metric,
        prune_round_to=args.prune_round_to,
        finetune_epochs=args.finetune_epochs,
    )
    folder = Path(tempfile.mkdtemp(prefix="keel-medical-edge-"))
    built = build_variants(load_predictor(version, state), recipe, cfg, folder, source=version.ref)
    val = load_split(recipe.data_path, "val")
    shifted = resample_prevalence(val, 0.625, seed=0)
    example = torch.from_numpy(val.images[:16]).float()[:, None] / 255
    rows, records = [], []
    base: dict[str, float] = {}
    timed = {v.name: v.module for v in built} | {f"{v.name} eager": v.eager for v in built if v.eager is not v.module}
    times = latencies(timed, example, repeats=args.repeats)
    for v in built:
        m = predictor_metrics(v.predictor, val.images, val.labels)
        s = predictor_metrics(v.predictor, shifted.images, shifted.labels)
        base = base or {"auc": m["auc"], "accuracy": m["accuracy"]}
        timing = times[v.name]
        eager = times.get(f"{v.name} eager", timing)
        row = {
            "variant": v.name,
            "runtime": v.export["format"] if v.export else "pytorch",
            "params": params_of(v.eager),
            "file MB": (v.path.stat().st_size / 1e6) if v.path else float("nan"),
            "val AUC": m["auc"],
            "dAUC": m["auc"] - base["auc"],
            "val acc": m["accuracy"],
            "dacc": m["accuracy"] - base["accuracy"],
            "ECE": m["ece"],
            "ECE uncal.": m["ece_uncalibrated"],
            "shift acc": s["accuracy"],
            "shift ECE": s["ece"],
            "b1 ms": timing["b1 median ms"],
            "b16 ms": timing["b16 median ms"],
            "eager b1 ms": eager["b1 median ms"],
            "eager b16 ms": eager["b16 median ms"],
        }
        registered = None
        if v.export is not None and not args.no_register:
            metrics = {"val_auc": m["auc"], "val_accuracy": m["accuracy"], "val_ece": m["ece"], **timing}
            registered = register_variant(registry, v, parent=version, cfg=cfg, metrics=metrics).ref
        rows.append(row)
        records.append(
            {
                "variant": v.name,
                "registered": registered,
                "val": m,
                "val_shifted_62_5pct": s,
                "latency": timing,
                "eager_latency": eager,
                "build_seconds": v.seconds,
                "calibration": {"temperature": v.predictor.temperature, "bias": v.predictor.bias},
                "export": {k: x for k, x in (v.export or {}).items() if k != "meta"},
            }
        )
        print(row, flush=True)
    title = f"{version.ref} ({version.config['net']['architecture']}, {version.config['net']['input_size']} px) on val"
    print_table(title, rows)
    payload = {
        "model": version.ref,
        "net": version.config["net"],
        "edge": dataclasses.asdict(cfg),
        "threads": args.threads,
        "repeats": args.repeats,
        "rows": rows,
        "runs": records,
        "load_average_1_5_15_min": list(os.getloadavg()),  # other jobs on the machine at the end of the run
    }
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
