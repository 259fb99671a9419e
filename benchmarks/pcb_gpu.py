"""PCB inspection, full GPU recipe: train under a hard wall-clock budget, score the board-group held-out 20%,
measure inference FPS at 640x640 and robustness to template shifts; write JSON, a log and the weights.

Reads the compact 1-bit PNG copy (``python -m apps.pcb_inspection.compact ../shared/data/pcb/DeepPCB/PCBData
.carry/pcb/PCBData``), needs only torch / torchvision / timm / lightning / numpy / pillow (no FastAPI), and runs
from the repository root without installing Keel::

    python3 benchmarks/pcb_gpu.py --budget-s 360            # on the GPU box; results in $OUT (or benchmarks/results)
    python3 benchmarks/pcb_gpu.py --device cpu --smoke      # end-to-end check on a CPU in ~1 minute

Writes ``pcb_gpu.json``, ``pcb_gpu.log`` and ``pcb_gpu_model.pt`` (fp16 state dict + config, loadable with
``torch.load(weights_only=True)``) into ``$OUT`` when set, else into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from apps.pcb_inspection.data import PcbDataset, board_group_split, read_list  # noqa: E402
from apps.pcb_inspection.evaluate import (  # noqa: E402
    detect_records,
    map50,
    pcb_metrics,
    prf_at_iou,
    same_pair_detections,
)
from apps.pcb_inspection.model import PcbPredictor, decode, to_input  # noqa: E402
from apps.pcb_inspection.train import RECIPES, fit  # noqa: E402

log = logging.getLogger("pcb_gpu")
SHIFTS = (0, 2, 4, 8)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO / ".carry" / "pcb" / "PCBData")
    p.add_argument("--list", type=Path, default=None, help="pair list (default: DATA_DIR/trainval.txt)")
    p.add_argument("--budget-s", type=float, default=360.0, help="wall-clock seconds of training (both stages)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--model", default=None, help="registered variant (default: the gpu recipe's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny model, few pairs, 20 s: checks the whole path")
    return p.parse_args()


def _out_dir() -> Path:
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _config(args: argparse.Namespace, device: str) -> Any:
    overrides: dict[str, Any] = {"budget_s": args.budget_s, "accelerator": device, "register_as": None}
    if args.smoke:
        overrides.update(model="pcb_det_tiny", crop=128, batch_size=4, num_workers=0, repeat=1, budget_s=20.0)
    if device == "cpu":
        overrides.update(precision="32", num_workers=args.workers or 0)
    for name in ("model", "batch_size", "crop", "lr"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.workers is not None:
        overrides["num_workers"] = args.workers
    cfg = dataclasses.replace(RECIPES.get("gpu"), **overrides)
    return dataclasses.replace(cfg, num_workers=_workers_for_shm(cfg.num_workers, cfg.batch_size * 2 * cfg.crop**2))


def _workers_for_shm(workers: int, batch_bytes: int) -> int:
    """Loader workers hand batches over in /dev/shm; a small one (containers default to 64 MB) kills them."""
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return workers
    fits = int(free // (batch_bytes * 4))  # each worker keeps ~2 batches in flight, doubled for safety
    if fits < workers:
        log.warning("/dev/shm has %.0f MB free: %d loader workers instead of %d", free / 1e6, fits, workers)
        return max(0, fits)
    return workers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _fps(predictor: PcbPredictor, device: str, *, batch: int, bf16: bool, reps: int) -> float:
    """Pairs per second at 640x640: input conversion, forward and peak decoding (to host) included."""
    images = torch.randint(0, 2, (batch, 2, 640, 640), dtype=torch.uint8)
    has = torch.ones(batch, dtype=torch.bool)
    model = predictor.model
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    def once() -> None:
        x = to_input(images.to(device, non_blocking=True), has.to(device))
        if device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            decode(model(x), k=model.cfg.max_detections, nms_iou=model.cfg.nms_iou)

    for _ in range(3):
        once()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    _sync(device)
    return batch * reps / (time.perf_counter() - t0)


def _evaluate(predictor: PcbPredictor, held: PcbDataset, threshold: float) -> dict[str, Any]:
    t0 = time.monotonic()
    dets = detect_records(predictor, held, batch_size=16)
    metrics = pcb_metrics(dets, held.records, threshold=threshold)
    no_template = detect_records(predictor, held, batch_size=16, with_template=False)
    metrics["map50_without_template"] = map50(no_template, held.records)[0]
    metrics["same_pair_detections_per_image"] = same_pair_detections(predictor, held, threshold=threshold)
    metrics["defects_per_image"] = sum(len(r.classes) for r in held.records) / max(1, len(held))
    shifts = {}
    for s in SHIFTS:
        d = dets if s == 0 else detect_records(predictor, held, batch_size=16, template_shift=s)
        shifts[str(s)] = {
            "map50": map50(d, held.records)[0],
            "f_score_iou033": prf_at_iou(d, held.records, threshold=threshold)["f_score_iou033"],
        }
    return {"metrics": metrics, "template_shift_px": shifts, "eval_seconds": round(time.monotonic() - t0, 1)}


def _save_weights(model: torch.nn.Module, cfg: Any, out: Path) -> dict[str, Any]:
    state = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    path = out / "pcb_gpu_model.pt"
    torch.save(
        {"state_dict": state, "net": dataclasses.asdict(model.cfg), "score_threshold": cfg.score_threshold}, path
    )
    return {"path": path.name, "mb": round(path.stat().st_size / 1e6, 2)}


def main() -> None:
    args = _args()
    out = _out_dir()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(out / "pcb_gpu.log", mode="w")],
    )
    wall0 = time.monotonic()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    os.environ.setdefault("KEEL_HOME", str(out / "keel_home"))  # Lightning's logs, off the repository
    cfg = _config(args, device)
    records = read_list(args.list or args.data_dir / "trainval.txt", args.data_dir)
    train, held_records = board_group_split(records, holdout=cfg.holdout)
    if args.smoke:
        train, held_records = train[:16], held_records[:8]
    held = PcbDataset(held_records)
    log.info(
        "device %s (%s); %d train / %d held-out pairs (groups %s); config %s",
        device,
        torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        len(train),
        len(held),
        sorted({r.group for r in held_records}),
        cfg,
    )
    model, stats = fit(cfg, train)
    predictor = PcbPredictor(model.to(device).eval(), score_threshold=cfg.score_threshold, device=device)
    model.to(memory_format=torch.channels_last)  # what tensor cores read; on a CPU smoke run it tests the same path
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    result.update(config=dataclasses.asdict(cfg), train=stats, held_out_groups=sorted({r.group for r in held_records}))
    result.update(_evaluate(predictor, held, cfg.score_threshold))
    reps = 3 if args.smoke else 50
    result["fps_640"] = {
        "batch1_fp32": _fps(predictor, device, batch=1, bf16=False, reps=reps),
        "batch1_bf16": _fps(predictor, device, batch=1, bf16=device == "cuda", reps=reps),
        "batch16_bf16": _fps(predictor, device, batch=16 if device == "cuda" else 2, bf16=device == "cuda", reps=reps),
    }
    result["weights"] = _save_weights(model, cfg, out)
    result["wall_seconds"] = round(time.monotonic() - wall0, 1)
    result["smoke"] = args.smoke
    (out / "pcb_gpu.json").write_text(json.dumps(result, indent=2))
    m = result["metrics"]
    log.info(
        "held-out mAP@0.5 %.4f, F@0.33 %.4f, per class %s",
        m["map50"],
        m["f_score_iou033"],
        {k: round(v, 4) for k, v in m["map50_per_class"].items()},
    )
    log.info("template shift: %s", {k: round(v["map50"], 4) for k, v in result["template_shift_px"].items()})
    log.info(
        "fps at 640: %s; wall %.1f s; wrote %s",
        {k: round(v, 1) for k, v in result["fps_640"].items()},
        result["wall_seconds"],
        out / "pcb_gpu.json",
    )
    print(json.dumps({k: result[k] for k in ("metrics", "template_shift_px", "fps_640", "train", "wall_seconds")}))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
