"""Metrics: COCO 101-point AP, mAP@0.5 per class, DeepPCB precision / recall / F-score at IoU 0.33."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apps.pcb_inspection.data import PairRecord
from apps.pcb_inspection.evaluate import average_precision_101, box_iou, map50, prf_at_iou
from apps.pcb_inspection.model import Detections


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
