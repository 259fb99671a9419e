"""PCB inspection on the CPU: held-out quality and inference FPS at 640x640 of a trained detector.

Scores a registered model (default ``pcb_inspection@production``) or a weights file written by
``benchmarks/pcb_gpu.py`` on the held-out part of its split (board group by default), with the template shifted by
0/2/4/8 px and without a template, then times fp32 inference on this machine's CPU::

    keel bench pcb_quality [--model pcb_inspection@2 | --weights pcb_gpu_model.pt] [--threads 2]

Writes ``benchmarks/results/pcb_quality.json`` (``--out NAME``: ``NAME.json``; ``NAME_fps.json`` with ``--fps-only``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from apps.pcb_inspection.data import PcbDataset, read_list  # noqa: E402
from apps.pcb_inspection.evaluate import (  # noqa: E402
    detect_records,
    map50,
    pcb_metrics,
    prf_at_iou,
    same_pair_detections,
)
from apps.pcb_inspection.model import PcbDetector, PcbDetectorConfig, PcbPredictor, decode, to_input  # noqa: E402
from apps.pcb_inspection.train import split_records  # noqa: E402
from benchmarks._common import print_table, write_json  # noqa: E402


def _load(args: argparse.Namespace) -> tuple[PcbPredictor, str]:
    if args.weights is not None:
        blob = torch.load(args.weights, map_location="cpu", weights_only=True)
        model = PcbDetector(PcbDetectorConfig(**blob["net"]))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
        return PcbPredictor(model.eval(), score_threshold=float(blob["score_threshold"])), str(args.weights)
    from apps.pcb_inspection.model import load_predictor
    from core.registry import ModelRegistry

    version, state = ModelRegistry().load(args.model)
    return load_predictor(version, state), version.ref


@torch.no_grad()
def cpu_fps(predictor: PcbPredictor, *, reps: int) -> float:
    """Pairs per second, batch 1, fp32, 640x640: input conversion, forward and decoding."""
    images = torch.randint(0, 2, (1, 2, 640, 640), dtype=torch.uint8)
    has = torch.ones(1, dtype=torch.bool)
    model = predictor.model.eval()
    decode(model(to_input(images, has)), k=model.cfg.max_detections, nms_iou=model.cfg.nms_iou)
    t0 = time.perf_counter()
    for _ in range(reps):
        decode(model(to_input(images, has)), k=model.cfg.max_detections, nms_iou=model.cfg.nms_iou)
    return reps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pcb_inspection@production")
    p.add_argument("--weights", type=Path, default=None, help="a pcb_gpu_model.pt from benchmarks/pcb_gpu.py")
    p.add_argument("--list", type=Path, default=None, help="DeepPCB list (default: the data dir's trainval.txt)")
    p.add_argument("--split", default="group", choices=("group", "random"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--fps-only", action="store_true", help="only time inference (no held-out scoring)")
    p.add_argument("--out", default="pcb_quality", help="results file name (benchmarks/results/OUT.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    predictor, name = _load(args)
    if args.fps_only:
        fps = cpu_fps(predictor, reps=args.reps)
        print(f"{name} ({predictor.model.cfg.backbone}): CPU fps at 640 (fp32, {args.threads} threads) {fps:.2f}")
        load = os.getloadavg()[0]  # a shared box: the load says what the figure is worth
        write_json(
            f"{args.out}_fps", {"model": name, "cpu_fps_640_fp32": fps, "threads": args.threads, "load_1min": load}
        )
        return
    if args.list is None:
        from core.config import data_dir

        root = data_dir()
        if root is None:
            raise SystemExit("no DeepPCB data: set KEEL_DATA_DIR or pass --list")
        args.list = root / "pcb" / "DeepPCB" / "PCBData" / "trainval.txt"
    _, held_records = split_records(read_list(args.list), split=args.split, holdout=0.2, seed=0)
    held = PcbDataset(held_records)
    thr = predictor.score_threshold
    dets = detect_records(predictor, held)
    result: dict[str, Any] = {"model": name, "split": args.split, "n_held_out": len(held)}
    result["metrics"] = pcb_metrics(dets, held_records, threshold=thr)
    result["map50_without_template"] = map50(detect_records(predictor, held, with_template=False), held_records)[0]
    result["same_pair_detections_per_image"] = same_pair_detections(predictor, held, threshold=thr)
    result["defects_per_image"] = sum(len(r.classes) for r in held_records) / max(1, len(held_records))
    shifts = {}
    for s in (0, 2, 4, 8):
        d = dets if s == 0 else detect_records(predictor, held, template_shift=s)
        shifts[str(s)] = {"map50": map50(d, held_records)[0], **prf_at_iou(d, held_records, threshold=thr)}
    result["template_shift_px"] = shifts
    result["cpu_fps_640_fp32"] = cpu_fps(predictor, reps=args.reps)
    result["threads"] = args.threads
    result["load_1min"] = os.getloadavg()[0]
    rows = [{"template shift px": k, "mAP@0.5": v["map50"], "F@0.33": v["f_score_iou033"]} for k, v in shifts.items()]
    print_table(f"{name} on the {args.split} held-out 20% ({len(held)} pairs)", rows)
    print(
        f"mAP@0.5 {result['metrics']['map50']:.4f}; without template {result['map50_without_template']:.4f}; "
        f"detections per image with the test image as its own template {result['same_pair_detections_per_image']:.2f} "
        f"(true defects {result['defects_per_image']:.2f}); "
        f"CPU fps at 640 (fp32, {args.threads} threads) {result['cpu_fps_640_fp32']:.2f}"
    )
    write_json(args.out, result)


if __name__ == "__main__":
    main()
