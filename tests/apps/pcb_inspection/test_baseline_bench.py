"""The Faster R-CNN baseline benchmark (benchmarks/pcb_baseline.py): test images only, labels mapped both ways,
and the whole path (train under a budget, score with the app's metrics, time) on a synthetic set."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from apps.pcb_inspection.data import PcbDataset, read_list, write_synthetic_set
from tests.utils.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("pcb_baseline")


class _Recorder(nn.Module):
    """Stands in for a torchvision detector: records what it is given, answers fixed detections."""

    def __init__(self) -> None:
        super().__init__()
        self.transform = SimpleNamespace(min_size=(0,), max_size=0)
        self.calls: list[tuple[list[torch.Tensor], Any]] = []

    def forward(self, images: list[torch.Tensor], targets: Any = None) -> Any:
        self.calls.append((images, targets))
        if targets is not None:
            return {"loss_a": torch.tensor(1.0), "loss_b": torch.tensor(2.0)}
        answer = {"boxes": torch.tensor([[1.0, 2.0, 9.0, 12.0]] * 2), "scores": torch.tensor([0.9, 0.4])}
        return [{**answer, "labels": torch.tensor([1, 6])} for _ in images]


def test_the_baseline_sees_the_test_image_alone_and_labels_shift_by_one(bench: ModuleType) -> None:
    images = torch.zeros(2, 2, 8, 8, dtype=torch.uint8)
    images[:, 0, 2:4, 2:4] = 1
    images[:, 1] = 1  # a template that differs everywhere: it must not reach the model
    boxes = torch.tensor([[[1.0, 1.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]], [[2.0, 2.0, 6.0, 7.0], [1.0, 1.0, 3.0, 3.0]]])
    classes = torch.tensor([[0, -1], [5, 2]])  # -1 pads the first image's list
    model = _Recorder()
    loss = bench._loss(model, (images, torch.ones(2, dtype=torch.bool), boxes, classes))
    assert loss.item() == 3.0  # the sum of torchvision's loss dict
    seen, targets = model.calls[0]
    assert len(seen) == 2 and seen[0].shape == (3, 8, 8)
    assert all(torch.equal(im, images[i, 0].float().expand(3, -1, -1)) for i, im in enumerate(seen))
    assert targets[0]["labels"].tolist() == [1] and targets[0]["boxes"].tolist() == [[1.0, 1.0, 5.0, 5.0]]
    assert targets[1]["labels"].tolist() == [6, 3]  # class index + 1: torchvision's 0 is background


def test_detections_map_labels_back_to_class_indices(bench: ModuleType, tmp_path: Path) -> None:
    records = read_list(write_synthetic_set(tmp_path, n=3, size=64))
    model = _Recorder()
    dets = bench.detect(model, PcbDataset(records), device="cpu", batch_size=2)
    assert len(dets) == 3 and [d.classes.tolist() for d in dets] == [[0, 5]] * 3
    assert dets[0].scores.tolist() == pytest.approx([0.9, 0.4])
    assert model.transform.min_size == (64,) and model.transform.max_size == 64  # whole images, not resized


def test_smoke_run_trains_scores_and_writes_the_contract(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    list_file = write_synthetic_set(tmp_path / "data", n=10, groups=5, size=128)
    monkeypatch.setenv("OUT", str(tmp_path))
    result = bench.main(["--smoke", "--list", str(list_file), "--max-steps", "2", "--out", "baseline"])
    written = json.loads((tmp_path / "baseline.json").read_text())
    assert written["train"]["steps"] == result["train"]["steps"] == 2
    assert written["config"]["arch"] == "mobilenet_v3_fpn" and written["n_held_out"] == 2
    assert {"map50", "map50_per_class", "f_score_iou033"} <= set(written["metrics"])
    assert 0.0 <= written["metrics"]["map50"] <= 1.0 and written["fps_640"]["batch1_fp32"] > 0
