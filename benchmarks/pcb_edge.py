"""PCB inspection edge export on the CPU: held-out quality and FPS of PyTorch fp32 against its exports.

Exports the detector (a ``pcb_gpu_model.pt`` from ``benchmarks/pcb_gpu.py`` or a registered version) with
:func:`apps.pcb_inspection.edge.export_edge` as ONNX fp32, ONNX Runtime static int8 (QDQ) and core's FX static int8
(TorchScript), each calibrated on training pairs of the board-group split and parity-checked by
:mod:`core.compression.export`; then, on the held-out part of that split (the README's 200 pairs), scores each one
through the same predictor (mAP@0.5 per class, DeepPCB P / R / F at IoU 0.33) and times batch-1 inference at
640x640 on ``--threads`` cores, decoding included, the variants interleaved round by round so that load from other
jobs hits all of them alike (ratios to PyTorch fp32 are the robust figure on a shared box)::

    keel bench pcb_edge --weights pcb_gpu_model.pt [--threads 2] [--reps 30] [--calibration-pairs 32] [--fps-only]
    keel bench pcb_edge --weights pcb_gpu_model.pt --prune 0.5 [--finetune-s 600]   # + the pruned model's variants

With ``--prune RATE`` the detector is also channel-pruned and fine-tuned on the training pairs
(:func:`apps.pcb_inspection.edge.prune_detector`), and the pruned model runs in PyTorch, ONNX Runtime fp32 and int8
next to the unpruned ones.

Writes ``benchmarks/results/pcb_edge.json`` (``pcb_edge_fps.json`` with ``--fps-only``: exports and timing only;
``pcb_edge_pruned50[_fps].json`` with ``--prune 0.5``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from apps.pcb_inspection.data import PcbDataset, read_list  # noqa: E402
from apps.pcb_inspection.edge import calibration_inputs, export_edge, load_source, prune_detector  # noqa: E402
from apps.pcb_inspection.evaluate import detect_records, pcb_metrics  # noqa: E402
from apps.pcb_inspection.model import LiteDetector, PcbPredictor  # noqa: E402
from apps.pcb_inspection.train import split_records  # noqa: E402
from benchmarks._common import print_table, write_json  # noqa: E402
from core.lite import LiteModel  # noqa: E402
from core.registry import ModelRegistry  # noqa: E402

#: Benchmark label -> edge export variant (None: the PyTorch model itself).
VARIANTS = {
    "pytorch fp32": None,
    "onnxruntime fp32": "fp32",
    "onnxruntime int8": "int8",
    "fx int8 torchscript": "int8-fx",
}
_SUFFIX = {"fp32": ".onnx", "int8": ".onnx", "int8-fx": ".pt"}


def _predictors(args: argparse.Namespace, work: Path) -> tuple[dict[str, PcbPredictor], dict[str, Any], Any]:
    src = load_source(str(args.weights or args.model), registry=ModelRegistry())
    train, held = split_records(read_list(args.list, args.data_dir), split="group", holdout=0.2, seed=0)
    calibration = calibration_inputs(train, n=args.calibration_pairs)
    models = {"": src.model}
    exports: dict[str, Any] = {}
    stats = None
    if args.prune is not None:
        pruned, stats = prune_detector(src.model, train, rate=args.prune, finetune_s=args.finetune_s,
                                       calibration=calibration, lr=args.finetune_lr,
                                       same_pair=args.finetune_same_pair)  # fmt: skip
        models[f"pruned {args.prune:.0%} "] = pruned
    predictors = {}
    for prefix, model in models.items():
        for label, variant in VARIANTS.items():
            if prefix and variant == "int8-fx":
                continue  # the pruned model's int8 runs in ONNX Runtime (the faster int8 path above)
            if variant is None:
                predictors[prefix + label] = PcbPredictor(model, score_threshold=src.score_threshold)
                continue
            name = f"pcb_{prefix.split('%')[0].replace(' ', '')}{variant}{_SUFFIX[variant]}"
            export = export_edge(model, work / name, variant=variant, calibration=calibration)
            lite = LiteDetector(LiteModel.load(export.path, threads=args.threads), src.model.cfg)
            predictors[prefix + label] = PcbPredictor(lite, score_threshold=src.score_threshold)
            exports[prefix + label] = export.to_dict()
    return predictors, exports, (src, held, len(calibration), stats)


@torch.no_grad()
def interleaved_fps(predictors: dict[str, PcbPredictor], pair: torch.Tensor, *, reps: int) -> dict[str, list[float]]:
    """Seconds per batch-1 call (input fusion, forward, peak decoding) of each predictor, one of each per round."""
    has = torch.ones(1, dtype=torch.bool)
    times: dict[str, list[float]] = {k: [] for k in predictors}
    for round_ in range(reps + 2):  # two warm-up rounds
        for label, predictor in predictors.items():
            start = time.perf_counter()
            predictor.detect(pair, has)
            if round_ >= 2:
                times[label].append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="a pcb_gpu_model.pt from benchmarks/pcb_gpu.py")
    p.add_argument("--model", default="pcb_inspection@production", help="registry ref (when --weights is not given)")
    p.add_argument("--list", type=Path, default=None, help="DeepPCB list (default: the data dir's trainval.txt)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder the list's paths are relative to")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30, help="timed rounds of the FPS comparison")
    p.add_argument("--calibration-pairs", type=int, default=32)
    p.add_argument("--work-dir", type=Path, default=None, help="keep the exported files here (default: a temp dir)")
    p.add_argument("--fps-only", action="store_true", help="skip the held-out scoring; write pcb_edge_fps.json")
    p.add_argument("--prune", type=float, default=None, metavar="RATE", help="also a RATE channel-pruned model")
    p.add_argument("--finetune-s", type=float, default=600.0, help="seconds of fine-tuning after --prune")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-same-pair", type=float, default=0.25, help="share of same pairs in the fine-tune")
    p.add_argument("--out", default=None, help="results file name (default: pcb_edge[_prunedNN][_fps])")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.list is None:
        from core.config import data_dir

        root = data_dir()
        if root is None:
            raise SystemExit("no DeepPCB data: set KEEL_DATA_DIR or pass --list")
        args.list = root / "pcb" / "DeepPCB" / "PCBData" / "trainval.txt"
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        predictors, exports, (src, held_records, n_calib, pruning) = _predictors(args, work)
        held = PcbDataset(held_records)
        quality, eval_s = {}, {}
        for label, predictor in ({} if args.fps_only else predictors).items():
            start = time.perf_counter()
            dets = detect_records(predictor, held)
            eval_s[label] = time.perf_counter() - start
            quality[label] = pcb_metrics(dets, held_records, threshold=predictor.score_threshold)
            print(f"{label}: mAP@0.5 {quality[label]['map50']:.4f} ({eval_s[label]:.0f} s)", file=sys.stderr)
        load_before = os.getloadavg()[0]
        times = interleaved_fps(predictors, torch.from_numpy(held.pair(0))[None], reps=args.reps)
        load_after = os.getloadavg()[0]
    _report(args, src=src, n_held=len(held_records), n_calib=n_calib, quality=quality, eval_s=eval_s,
            times=times, exports=exports, load=(load_before, load_after), pruning=pruning)  # fmt: skip


def _report(args: argparse.Namespace, *, src: Any, n_held: int, n_calib: int, quality: dict[str, Any],
            eval_s: dict[str, float], times: dict[str, list[float]], exports: dict[str, Any],
            load: tuple[float, float], pruning: dict[str, Any] | None) -> None:  # fmt: skip
    base = "pytorch fp32"
    fps = {k: 1 / statistics.median(v) for k, v in times.items()}
    # per-round speed ratios: both calls of a round saw about the same load
    ratio = {k: statistics.median(b / t for b, t in zip(times[base], v, strict=True)) for k, v in times.items()}
    rows, variants = [], {}
    for label in times:
        size = exports[label]["size_bytes"] / 1e6 if label in exports else "-"
        variants[label] = {"cpu_fps_640_b1": fps[label], "speedup_vs_pytorch_fp32": ratio[label],
                           "seconds_per_call": times[label], "export": exports.get(label)}  # fmt: skip
        row: dict[str, Any] = {"variant": label}
        if label in quality:
            m = quality[label]
            variants[label].update(metrics=m, map50_change=m["map50"] - quality[base]["map50"],
                                   f_score_change=m["f_score_iou033"] - quality[base]["f_score_iou033"],
                                   eval_seconds=eval_s[label])  # fmt: skip
            row.update({"mAP@0.5": m["map50"], "change": variants[label]["map50_change"]})
            row["F@0.33"] = m["f_score_iou033"]
        rows.append({**row, "FPS 640 b1": fps[label], "x fp32 torch": ratio[label], "MB": size})
    print_table(f"{src.source}: board-group held-out 20% ({n_held} pairs), {args.threads} CPU threads", rows)
    print(f"load average (1 min) {load[0]:.1f} before / {load[1]:.1f} after the FPS rounds")
    pruned = f"_pruned{round(100 * args.prune)}" if args.prune is not None else ""
    name = args.out or f"pcb_edge{pruned}" + ("_fps" if args.fps_only else "")
    write_json(name, {
        "model": src.source, "split": "group", "n_held_out": n_held, "calibration_pairs": n_calib,
        "threads": args.threads, "reps": args.reps, "image": "640x640, batch 1, decoding included",
        "load_1min_before_after_fps": list(load), "variants": variants, "pruning": pruning,
    })  # fmt: skip


if __name__ == "__main__":
    main()
