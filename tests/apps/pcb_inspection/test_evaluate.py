"""Metrics: COCO 101-point AP, mAP@0.5 per class, DeepPCB precision / recall / F-score at IoU 0.33; the same-pair
false-alarm check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apps.pcb_inspection.data import PairRecord, read_list, write_synthetic_set
from apps.pcb_inspection.evaluate import (
    average_precision_101,
    box_iou,
    detect_records,
    map50,
    prf_at_iou,
    same_pair_detections,
)
from apps.pcb_inspection.model import Detections, PcbDetectorConfig, PcbPredictor


def _record(boxes: list[list[float]], classes: list[int]) -> PairRecord:
    p = Path("x")
    return PairRecord(p, p, p, "g", np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64))


def _dets(boxes: list[list[float]], scores: list[float], classes: list[int]) -> Detections:
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores), np.asarray(classes))


def test_box_iou() -> None:
    iou = box_iou(
        np.array([[0, 0, 10, 10]], float), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    )
    np.testing.assert_allclose(iou, [[1.0, 1 / 3, 0.0]])


def test_ap_101_known_values() -> None:
    assert average_precision_101(np.array([0.9, 0.8]), np.array([True, True]), 2) == pytest.approx(1.0)
    # A false positive ranked first: precision 1/2 at recall 1 -> every recall point sees 0.5.
    assert average_precision_101(np.array([0.9, 0.8]), np.array([False, True]), 1) == pytest.approx(0.5)
    # Half the ground truth found at precision 1: recall points 0..0.5 (51 of 101) score 1.
    assert average_precision_101(np.array([0.9]), np.array([True]), 2) == pytest.approx(51 / 101)
    assert np.isnan(average_precision_101(np.array([]), np.array([], bool), 0))


def test_map50_per_class_and_class_mismatch() -> None:
    records = [_record([[0, 0, 20, 20], [50, 50, 70, 70]], [0, 3])]
    perfect = [_dets([[0, 0, 20, 20], [50, 50, 70, 70]], [0.9, 0.8], [0, 3])]
    m, per_class = map50(perfect, records)
    assert m == pytest.approx(1.0) and per_class == {"open": pytest.approx(1.0), "spur": pytest.approx(1.0)}
    wrong_class = [_dets([[0, 0, 20, 20], [50, 50, 70, 70]], [0.9, 0.8], [1, 3])]
    m, per_class = map50(wrong_class, records)
    assert per_class["open"] == 0.0 and m == pytest.approx(0.5)


def test_deeppcb_f_score_uses_iou_above_one_third_and_the_threshold() -> None:
    records = [_record([[0, 0, 30, 10]], [2])]
    # IoU 0.5 with the box: correct at 0.33, and a low-score false positive dropped by the threshold.
    dets = [_dets([[10, 0, 40, 10], [100, 100, 120, 120]], [0.8, 0.1], [2, 2])]
    assert prf_at_iou(dets, records, threshold=0.3) == {
        "precision_iou033": 1.0,
        "recall_iou033": 1.0,
        "f_score_iou033": 1.0,
    }
    loose = prf_at_iou(dets, records, threshold=0.05)
    assert loose["precision_iou033"] == 0.5 and loose["f_score_iou033"] == pytest.approx(2 / 3)
    # IoU 0.25: not a match at 0.33.
    far = [_dets([[20, 0, 50, 10]], [0.9], [2])]
    assert prf_at_iou(far, records, threshold=0.3)["recall_iou033"] == 0.0


def test_a_box_is_matched_once() -> None:
    records = [_record([[0, 0, 20, 20]], [5])]
    dets = [_dets([[0, 0, 20, 20], [1, 1, 20, 20]], [0.9, 0.8], [5, 5])]
    assert prf_at_iou(dets, records, threshold=0.0)["precision_iou033"] == 0.5


class _Rule(nn.Module):
    """A fixed detector: class-0 heat where the pair differs (``compare``) or where the test image is copper."""

    def __init__(self, compare: bool) -> None:
        super().__init__()
        self.cfg, self.compare = PcbDetectorConfig(), compare

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cue = (x[:, :1] - x[:, 1:2]).abs() / 2 if self.compare else (x[:, :1] + 1) / 2
        heat = F.max_pool2d(cue, 4) * 20 - 10  # logits: about +10 on the cue, -10 elsewhere
        heat = torch.cat([heat, torch.full_like(heat, -10.0).expand(-1, 5, -1, -1)], dim=1)
        b, _, h, w = heat.shape
        return heat, torch.full((b, 2, h, w), 2.0), torch.full((b, 2, h, w), 0.5)


def test_same_pairs_fool_a_detector_that_only_looks(tmp_path: Path) -> None:
    records = read_list(write_synthetic_set(tmp_path, n=3, size=128, ext="png"))
    comparing, looking = PcbPredictor(_Rule(compare=True)), PcbPredictor(_Rule(compare=False))
    assert same_pair_detections(comparing, records, threshold=0.5) == 0
    assert same_pair_detections(looking, records, threshold=0.5) >= 1
    assert map50(detect_records(comparing, records), records)[0] > 0  # it does find the real differences
