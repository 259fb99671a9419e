"""``keel eval pcb_inspection``: mAP@0.5 (COCO 101-point) per class and overall, and DeepPCB's F-score at IoU 0.33.

DeepPCB's protocol (its ``evaluation/script.py``, after ICDAR 2015): a detection is correct when its IoU with an
unmatched ground-truth box of the same class exceeds 0.33; precision and recall over all images at the model's
score threshold, F = 2PR / (P + R). mAP@0.5 uses every decoded peak, ranked by score, matched greedily per class at
IoU >= 0.5, with COCO's 101-point interpolated precision.

Run::

    keel eval pcb_inspection --data-dir ../shared/data/pcb/DeepPCB/PCBData --list LISTFILE [--model pcb_inspection@3]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.pcb_inspection.data import CLASSES, PairRecord, PcbDataset, collate, read_list, shift_image
from apps.pcb_inspection.model import Detections, PcbPredictor, load_predictor

__all__ = [
    "average_precision_101",
    "box_iou",
    "detect_records",
    "evaluate",
    "map50",
    "pcb_metrics",
    "prf_at_iou",
    "same_pair_detections",
]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) boxes x1,y1,x2,y2 -> (N, M) IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _match(det: Detections, gt_boxes: np.ndarray, gt_classes: np.ndarray, *, iou: float, strict: bool) -> np.ndarray:
    """Greedy by score: True for each detection matched to an unused same-class box (IoU > or >= ``iou``)."""
    order = np.argsort(-det.scores, kind="stable")
    hit = np.zeros(len(det.scores), dtype=bool)
    used = np.zeros(len(gt_classes), dtype=bool)
    ious = box_iou(det.boxes, gt_boxes) if len(gt_boxes) and len(det.scores) else None
    for i in order:
        if ious is None:
            break
        cand = (gt_classes == det.classes[i]) & ~used
        if not cand.any():
            continue
        scores = np.where(cand, ious[i], -1.0)
        j = int(scores.argmax())
        if scores[j] > iou if strict else scores[j] >= iou:
            hit[i], used[j] = True, True
    return hit


def average_precision_101(scores: np.ndarray, hits: np.ndarray, n_gt: int) -> float:
    """COCO-style AP: precision made monotone, sampled at recall 0, 0.01, ..., 1."""
    if n_gt == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    recall = tp / n_gt
    precision = tp / np.arange(1, len(tp) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    points = np.linspace(0, 1, 101)
    idx = np.searchsorted(recall, points, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def map50(dets: Sequence[Detections], records: Sequence[PairRecord]) -> tuple[float, dict[str, float]]:
    """mAP@0.5 and AP per class name (classes without any ground truth are left out of the mean)."""
    per_class: dict[str, float] = {}
    hits = [_match(d, r.boxes, r.classes, iou=0.5, strict=False) for d, r in zip(dets, records, strict=True)]
    for k, name in enumerate(CLASSES):
        scores = np.concatenate([d.scores[d.classes == k] for d in dets])
        matched = np.concatenate([h[d.classes == k] for d, h in zip(dets, hits, strict=True)])
        n_gt = int(sum((r.classes == k).sum() for r in records))
        ap = average_precision_101(scores, matched, n_gt)
        if not np.isnan(ap):
            per_class[name] = ap
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


def prf_at_iou(
    dets: Sequence[Detections], records: Sequence[PairRecord], *, threshold: float, iou: float = 0.33
) -> dict[str, float]:
    """DeepPCB protocol: precision, recall, F-score of detections scoring >= ``threshold`` (IoU > ``iou``)."""
    tp = n_det = 0
    for d, r in zip(dets, records, strict=True):
        kept = d.above(threshold)
        tp += int(_match(kept, r.boxes, r.classes, iou=iou, strict=True).sum())
        n_det += len(kept.scores)
    n_gt = sum(len(r.classes) for r in records)
    p = tp / n_det if n_det else 0.0
    rec = tp / n_gt if n_gt else 0.0
    f = 2 * p * rec / (p + rec) if p + rec else 0.0
    return {"precision_iou033": p, "recall_iou033": rec, "f_score_iou033": f}


def pcb_metrics(dets: Sequence[Detections], records: Sequence[PairRecord], *, threshold: float) -> dict[str, Any]:
    """The SPEC section 5 ``metrics`` object."""
    m, per_class = map50(dets, records)
    return {"map50": m, "map50_per_class": per_class, **prf_at_iou(dets, records, threshold=threshold)}


@torch.no_grad()
def detect_records(
    predictor: PcbPredictor,
    records: Sequence[PairRecord] | PcbDataset,
    *,
    template_shift: int = 0,
    with_template: bool = True,
    same_pair: bool = False,
    batch_size: int = 8,
) -> list[Detections]:
    """Every decoded peak for each pair (whole images), optionally with the template moved by
    ``(template_shift, template_shift)`` px (right and down), left out, or replaced by the test image itself
    (``same_pair``: a detector that compares finds nothing then; one that only looks finds the defects)."""
    data = records if isinstance(records, PcbDataset) else PcbDataset(records)
    predictor.model.eval()
    out: list[Detections] = []
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        images, _, _, _ = collate(items)
        if same_pair:
            images[:, 1] = images[:, 0]
        if template_shift:
            shifted = [shift_image(im[1].numpy(), template_shift, template_shift) for im in images]
            images[:, 1] = torch.from_numpy(np.stack(shifted))
        has = torch.full((len(items),), with_template, dtype=torch.bool)
        out.extend(predictor.detect(images, has))
    return out


def same_pair_detections(
    predictor: PcbPredictor, records: Sequence[PairRecord] | PcbDataset, *, threshold: float
) -> float:
    """Detections per image at ``threshold`` when each template is its own test image: false alarms of a
    detector that judges by looks instead of comparing (compare with the true defects per image)."""
    dets = detect_records(predictor, records, same_pair=True)
    return sum(len(d.above(threshold).scores) for d in dets) / max(1, len(dets))


def evaluate(model_ref: str, *, data_dir: Path | str, list_file: Path | str, registry: Any) -> dict[str, Any]:
    """Scores ``model_ref`` on the pairs of ``list_file`` (DeepPCB format); the SPEC section 5 object."""
    version, state = registry.load(model_ref)
    predictor = load_predictor(version, state)
    records = read_list(list_file, data_dir)
    dets = detect_records(predictor, records)
    return {
        "app": "pcb_inspection",
        "model": version.ref,
        "data": str(list_file),
        "n": len(records),
        "metrics": {**pcb_metrics(dets, records, threshold=predictor.score_threshold)},
        "score_threshold": predictor.score_threshold,
        "n_boxes": int(sum(len(r.classes) for r in records)),
    }
