"""The detector: every registered variant trains, saves and loads; targets and decoding agree; the predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apps.pcb_inspection.model import (
    MODELS,
    STRIDE,
    PcbDetector,
    PcbPredictor,
    _targets,
    create_model,
    decode,
    detection_loss,
    load_predictor,
    to_input,
)
from core.registry import ModelRegistry


@pytest.mark.parametrize("name", MODELS.names())
def test_every_variant_trains_saves_and_loads(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    images = torch.randint(0, 2, (2, 2, 64, 64), dtype=torch.uint8)
    boxes = torch.tensor([[[8.0, 8.0, 30.0, 20.0]], [[30.0, 40.0, 60.0, 60.0]]])
    classes = torch.tensor([[1], [5]])
    outputs = model(to_input(images))
    assert outputs[0].shape == (2, 6, 16, 16) and outputs[1].shape == outputs[2].shape == (2, 2, 16, 16)
    loss, parts = detection_loss(outputs, boxes, classes)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"focal", "size", "offset"}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    clone = PcbDetector(model.cfg)
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(to_input(images))[0], model(to_input(images))[0])


def test_giou_term_is_zero_for_perfect_boxes_and_pulls_sizes_towards_the_target() -> None:
    boxes = torch.tensor([[[40.0, 20.0, 80.0, 44.0]]])
    classes = torch.tensor([[2]])
    logits = torch.full((1, 6, 32, 32), -5.0)
    size, offset = torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32)
    cx, cy = 60 / STRIDE, 32 / STRIDE  # the box centre, in cells: (15, 8) exactly
    size[0, :, int(cy), int(cx)] = torch.tensor([40 / STRIDE, 24 / STRIDE])
    _, parts = detection_loss((logits, size, offset), boxes, classes, giou_weight=1.0)
    assert parts["giou"].abs() < 1e-6
    small = (size * 0.5).requires_grad_()
    loss, parts = detection_loss((logits, small, offset), boxes, classes, giou_weight=1.0)
    plain, _ = detection_loss((logits, small, offset), boxes, classes)
    assert 0.5 < parts["giou"] < 1 and torch.isclose(loss, plain + parts["giou"])  # IoU 0.25 at half the size
    loss.backward()
    assert (small.grad[0, :, int(cy), int(cx)] < 0).all()  # gradient descent grows the box


def test_template_dropout_zeroes_the_template_channel() -> None:
    images = torch.ones(2, 2, 4, 4, dtype=torch.uint8)
    x = to_input(images, torch.tensor([True, False]))
    assert x[0].eq(1).all() and x[1, 0].eq(1).all() and x[1, 1].eq(0).all()


def test_heatmap_targets_peak_at_box_centres() -> None:
    boxes = torch.tensor([[[40.0, 20.0, 80.0, 44.0], [0.0, 0.0, 0.0, 0.0]]])
    heat = _targets(boxes, torch.tensor([[2, -1]]), (32, 32), 6)
    assert heat.shape == (1, 6, 32, 32) and heat[0, 2, 8, 15] == 1.0  # centre (60, 32) px -> cell (15, 8)
    assert heat[0, 2].eq(1).sum() == 1 and heat[0, [0, 1, 3, 4, 5]].max() == 0


def test_decoding_perfect_outputs_recovers_the_boxes() -> None:
    boxes = torch.tensor([[[40.0, 20.0, 80.0, 44.0], [10.0, 70.0, 31.0, 101.0]]])
    classes = torch.tensor([[2, 4]])
    heat = _targets(boxes, classes, (32, 32), 6)
    logits = torch.logit(heat.clamp(1e-6, 1 - 1e-6))
    size, offset = torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32)
    for x1, y1, x2, y2 in boxes[0].tolist():
        cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
        size[0, :, int(cy), int(cx)] = torch.tensor([(x2 - x1) / STRIDE, (y2 - y1) / STRIDE])
        offset[0, :, int(cy), int(cx)] = torch.tensor([cx - int(cx), cy - int(cy)])
    det = decode((logits, size, offset), k=5)[0].above(0.99)
    order = np.argsort(det.classes)
    np.testing.assert_allclose(det.boxes[order], boxes[0].numpy(), atol=1e-4)
    assert det.classes[order].tolist() == [2, 4]


def test_nms_drops_a_second_peak_on_the_same_defect_but_not_another_class() -> None:
    logits = torch.full((1, 6, 16, 16), -10.0)
    logits[0, 1, 8, 4], logits[0, 1, 8, 7] = 3.0, 2.0  # one long defect, two peaks 3 cells apart
    logits[0, 3, 8, 7] = 1.0  # another class at the same place
    size = torch.zeros(1, 2, 16, 16)
    size[0, 0], size[0, 1] = 12.0, 4.0  # every box 48 x 16 px: the two class-1 boxes overlap with IoU 0.6
    offset = torch.zeros(1, 2, 16, 16)
    peaks = decode((logits, size, offset), k=3)[0]
    kept = decode((logits, size, offset), k=3, nms_iou=0.5)[0]
    assert sorted(peaks.classes.tolist()) == [1, 1, 3]
    assert kept.classes.tolist() == [1, 3] and kept.scores[0] == peaks.scores.max()
    assert decode((logits, size, offset), k=3, nms_iou=0.7)[0].classes.tolist() == [1, 1, 3]


def test_predictor_handles_missing_templates_and_sizes() -> None:
    predictor = PcbPredictor(create_model("pcb_det_tiny").eval(), score_threshold=0.0)
    rng = np.random.default_rng(0)
    items = [
        (rng.integers(0, 256, (64, 64), dtype=np.uint8), rng.integers(0, 256, (64, 64), dtype=np.uint8)),
        (rng.integers(0, 256, (50, 70), dtype=np.uint8), None),  # padded to 64 x 96 inside
    ]
    out = predictor.predict_batch(items)
    assert len(out) == 2 and all(1 <= len(o) <= predictor.model.cfg.max_detections for o in out)
    for d in out[1]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 70 and 0 <= y1 <= y2 <= 50 and 0 <= d["score"] <= 1
        assert d["class"] in ("open", "short", "mousebite", "spur", "copper", "pin-hole")


def test_load_predictor_rebuilds_from_the_registry(tmp_path: Path) -> None:
    model = create_model("pcb_det_tiny").eval()
    registry = ModelRegistry(tmp_path)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    config = {"net": model.hparams, "score_threshold": 0.4}
    mv = registry.register("pcb", half, architecture="pcb_det_tiny", config=config)
    predictor = load_predictor(*registry.load(mv.ref))
    assert predictor.score_threshold == 0.4
    x = to_input(torch.randint(0, 2, (1, 2, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        torch.testing.assert_close(predictor.model(x)[0], model(x)[0], atol=0.05, rtol=0.05)
