"""PCB inspection: the plain baseline a user would try first, on Keel's split, budget and scoring.

torchvision's Faster R-CNN ResNet-50-FPN (issue #6's reference), trained from scratch on the **test images
alone** (no template), under the same wall-clock budget, optimiser and schedule as Keel's template-aware
detector (``core.training.Trainer``: AdamW, warm-up + cosine over the budget), with the same augmentation
(random crops, the 8 flips / rotations), then scored on the same held-out pairs by the same code
(``apps.pcb_inspection.evaluate``: mAP@0.5, DeepPCB's F-score at IoU 0.33) and timed at 640x640::

    keel bench pcb_baseline --budget-s 1800                    # this CPU: 8 x 256 px crops, precision "auto"
    python3 benchmarks/pcb_baseline.py --device cuda --budget-s 330   # the issue's setup: whole 640 px images, fp16
    python3 benchmarks/pcb_baseline.py --device cpu --smoke    # the whole path in about a minute

``--arch mobilenet_v3_fpn`` trains torchvision's lighter Faster R-CNN MobileNetV3-Large-FPN instead. Runs from the
repository root without installing Keel (the GPU box reads the compact copy in ``.carry/pcb/PCBData``). Writes
``OUT.json`` (``--out``, default ``pcb_baseline``) into ``$OUT`` when set, else into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from apps.pcb_inspection.data import PcbDataset, collate, read_list  # noqa: E402
from apps.pcb_inspection.evaluate import pcb_metrics, prf_at_iou  # noqa: E402
from apps.pcb_inspection.model import Detections  # noqa: E402
from apps.pcb_inspection.train import PcbTrainConfig, split_records, train_on_pairs  # noqa: E402
from benchmarks._common import print_table, write_json  # noqa: E402

log = logging.getLogger("pcb_baseline")
ARCHS = ("resnet50_fpn", "mobilenet_v3_fpn")
SCORE_THRESHOLD = 0.3  # the F-score threshold Keel's detector is scored at


def build(arch: str, *, side: int) -> torch.nn.Module:
    """A Faster R-CNN for DeepPCB's 6 classes (+ background), random weights, inputs kept at their own size."""
    from torchvision.models import detection

    factory = {
        "resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
        "mobilenet_v3_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
    }[arch]
    # From scratch (no weights reachable here, and none for binary PCB scans): torchvision then uses plain,
    # trainable BatchNorm everywhere. Binary inputs in {0, 1} are normalised to [-1, 1].
    model = factory(weights=None, weights_backbone=None, num_classes=7, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    set_side(model, side)
    return model


def set_side(model: torch.nn.Module, side: int) -> None:
    """Makes the model's resize transform a no-op for ``side`` x ``side`` inputs (crops in training, 640 after)."""
    model.transform.min_size, model.transform.max_size = (side,), side  # type: ignore[union-attr]


def _as_images(images: torch.Tensor) -> list[torch.Tensor]:
    """(B, 2, H, W) uint8 pairs -> the test images alone, as 3-channel float {0, 1} (template dropped)."""
    return list(images[:, 0:1].float().expand(-1, 3, -1, -1))


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    images, _, boxes, classes = batch
    targets = [{"boxes": b[c >= 0], "labels": c[c >= 0] + 1} for b, c in zip(boxes, classes, strict=True)]
    return sum(model(_as_images(images), targets).values())


def train(
    model: torch.nn.Module,
    records: Sequence[Any],
    *,
    budget_s: float | None,
    max_steps: int = -1,
    crop: int,
    batch_size: int,
    lr: float,
    precision: str,
    accelerator: str,
    workers: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Trains ``model`` in place as Keel's detector is trained (the same loader, Trainer and budget schedule);
    returns run stats."""
    cfg = PcbTrainConfig(
        model=type(model).__name__,
        crop=crop,
        max_shift=0,  # no template: no misregistration or dropout to simulate
        template_dropout=0.0,
        batch_size=batch_size,
        lr=lr,
        budget_s=budget_s,
        max_steps=max_steps,
        precision=precision,
        accelerator=accelerator,
        num_workers=workers,
        seed=seed,
        register_as=None,
        progress=False,
    )
    torch.manual_seed(seed)
    return train_on_pairs(model.train(), cfg, list(records), loss_fn=_loss)


@torch.no_grad()
def detect(model: torch.nn.Module, data: PcbDataset, *, device: str, batch_size: int = 4) -> list[Detections]:
    """Every detection torchvision keeps (score >= 0.05, at most 100 per image) on each whole test image."""
    model.eval().to(device)
    out: list[Detections] = []
    for start in range(0, len(data), batch_size):
        images, _, _, _ = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        set_side(model, int(max(images.shape[-2:])))
        for d in model([im.to(device) for im in _as_images(images)]):
            out.append(
                Detections(
                    d["boxes"].float().cpu().numpy(),
                    d["scores"].float().cpu().numpy(),
                    (d["labels"] - 1).cpu().numpy().astype(np.int64),
                )
            )
    return out


@torch.no_grad()
def fps_640(model: torch.nn.Module, *, device: str, half: bool, reps: int) -> float:
    """Images per second at 640x640, batch 1, resize transform, forward and box decoding / NMS included."""
    model.eval().to(device)
    set_side(model, 640)
    image = torch.randint(0, 2, (3, 640, 640), device=device).float()
    amp = torch.autocast(device, dtype=torch.float16, enabled=half)

    def once() -> None:
        with amp:
            model([image])

    once()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    if device == "cuda":
        torch.cuda.synchronize()
    return reps / (time.perf_counter() - t0)


def _default_list(data_dir: Path | None) -> Path:
    """DATA_DIR's list, else the shared data's, else the compact copy carried to a GPU box."""
    if data_dir is not None:
        return data_dir / "trainval.txt"
    from core.config import data_dir as shared_data

    root = shared_data()
    if root is not None and (root / "pcb" / "DeepPCB" / "PCBData").is_dir():
        return root / "pcb" / "DeepPCB" / "PCBData" / "trainval.txt"
    carried = REPO / ".carry" / "pcb" / "PCBData"
    if carried.is_dir():
        return carried / "trainval.txt"
    raise SystemExit("no DeepPCB data: set KEEL_DATA_DIR or pass --list / --data-dir")


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50_fpn", choices=ARCHS)
    p.add_argument("--data-dir", type=Path, default=None, help="folder the list's paths are relative to")
    p.add_argument("--list", type=Path, default=None, help="DeepPCB pair list (default: DATA_DIR/trainval.txt)")
    p.add_argument("--split", default="group", choices=("group", "random"))
    p.add_argument("--budget-s", type=float, default=1800.0, help="wall-clock seconds of training")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (with or without a budget)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--crop", type=int, default=None, help="training crop side (default: 256 on a CPU, 640 on a GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on a CPU, 16 on a GPU")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: 0 on a CPU, 8 on a GPU)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="mobilenet, 16 / 8 pairs, 20 s: checks the whole path")
    p.add_argument("--out", default="pcb_baseline", help="results file name (OUT.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    wall0 = time.monotonic()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    crop = args.crop or (640 if gpu else 256)
    batch_size = args.batch_size or (16 if gpu else 8)
    workers = args.workers if args.workers is not None else (8 if gpu else 0)
    if args.smoke:
        args.arch, args.budget_s, crop, batch_size = "mobilenet_v3_fpn", 20.0, 128, 2
    if os.environ.get("OUT"):  # the GPU box: Lightning's logs go with the results, off the repository
        os.environ.setdefault("KEEL_HOME", str(Path(os.environ["OUT"]) / "keel_home"))
    records = read_list(args.list or _default_list(args.data_dir), args.data_dir)
    train_records, held_records = split_records(records, split=args.split, holdout=0.2, seed=args.seed)
    if args.smoke:
        train_records, held_records = train_records[:16], held_records[:8]
    log.info("%s on %s: %d training / %d held-out pairs", args.arch, device, len(train_records), len(held_records))
    model = build(args.arch, side=crop)
    stats = train(
        model,
        train_records,
        budget_s=args.budget_s,
        max_steps=args.max_steps,
        crop=crop,
        batch_size=batch_size,
        lr=args.lr,
        # fp16 on the GPU, as the baseline; on a CPU Keel's own choice, as for its detector (bf16-mixed here)
        precision="16-mixed" if gpu else "auto",
        accelerator=device,
        workers=workers,
        seed=args.seed,
    )
    log.info("trained: %s", stats)
    held = PcbDataset(held_records)
    dets = detect(model, held, device=device)
    result: dict[str, Any] = {
        "baseline": f"torchvision Faster R-CNN {args.arch}, from scratch, test images only (no template)",
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "split": args.split,
        "held_out_groups": sorted({r.group for r in held_records}),
        "n_train": len(train_records),
        "n_held_out": len(held_records),
        "config": {"arch": args.arch, "crop": crop, "batch_size": batch_size, "lr": args.lr, "budget_s": args.budget_s},
        "train": stats,
        "metrics": pcb_metrics(dets, held_records, threshold=SCORE_THRESHOLD),
        "f_score_iou033_at_0.5": prf_at_iou(dets, held_records, threshold=0.5)["f_score_iou033"],
        "score_threshold": SCORE_THRESHOLD,
    }
    reps = 2 if args.smoke else (50 if gpu else 10)
    result["fps_640"] = {"batch1_fp32": fps_640(model, device=device, half=False, reps=reps)}
    if gpu:
        result["fps_640"]["batch1_fp16"] = fps_640(model, device=device, half=True, reps=reps)
    else:
        result["threads"] = args.threads
    result["load_1min"] = os.getloadavg()[0]  # a shared box: the load says what the timings are worth
    result["wall_seconds"] = round(time.monotonic() - wall0, 1)
    result["smoke"] = args.smoke
    _write(args.out, result)
    m = result["metrics"]
    rows = [{"class": k, "AP@0.5": v} for k, v in m["map50_per_class"].items()]
    print_table(f"{result['baseline']}, {args.split} held-out ({len(held_records)} pairs)", rows)
    print(
        f"mAP@0.5 {m['map50']:.4f}; P / R / F @ IoU 0.33 (score >= {SCORE_THRESHOLD}) {m['precision_iou033']:.3f} / "
        f"{m['recall_iou033']:.3f} / {m['f_score_iou033']:.3f}; {stats['steps']} steps in {stats['train_seconds']} s; "
        f"fps at 640 {', '.join(f'{k} {v:.2f}' for k, v in result['fps_640'].items())}"
    )
    return result


def _write(name: str, result: dict[str, Any]) -> None:
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / f"{name}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}", file=sys.stderr)
    else:
        write_json(name, result)


if __name__ == "__main__":
    main()
