"""Training registers a model with its held-out metrics; ``keel eval pcb_inspection`` follows SPEC section 5."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apps.pcb_inspection.data import read_list
from apps.pcb_inspection.evaluate import detect_records, evaluate
from apps.pcb_inspection.model import load_predictor
from apps.pcb_inspection.train import RECIPES, PcbTrainConfig, _parse, main, split_records
from core.cli import build_cli
from core.registry import ModelRegistry
from tests.apps.pcb_inspection.conftest import Trained


def test_training_registers_production_with_group_held_out_metrics(trained: Trained) -> None:
    registry = ModelRegistry(trained.registry_root)
    mv = registry.get("pcb_inspection@production")
    assert mv.ref == trained.ref and mv.architecture == "pcb_det_tiny"
    assert mv.config["net"]["backbone"] == "resnet10t" and mv.config["score_threshold"] == 0.3
    report = trained.report
    assert report["split"] == "group" and report["n_held_out"] == 2 and len(report["held_out_groups"]) == 1
    assert report["train"]["steps"] == 2
    assert {"map50", "map50_per_class", "f_score_iou033"} <= set(report["metrics"])
    assert 0.0 <= mv.metrics["map50"] <= 1.0


def test_evaluate_follows_the_spec_contract(trained: Trained) -> None:
    result = evaluate(
        trained.ref,
        data_dir=trained.list_file.parent,
        list_file=trained.list_file,
        registry=ModelRegistry(trained.registry_root),
    )
    assert result["app"] == "pcb_inspection" and result["model"] == trained.ref and result["n"] == 6
    metrics = result["metrics"]
    assert set(metrics) == {"map50", "map50_per_class", "precision_iou033", "recall_iou033", "f_score_iou033"}
    assert all(0.0 <= v <= 1.0 for v in metrics["map50_per_class"].values())
    assert set(metrics["map50_per_class"]) <= {"open", "short", "mousebite", "spur", "copper", "pin-hole"}


def test_keel_eval_cli_prints_json_last_and_names_bad_lines(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_HOME", str(trained.registry_root.parent))
    registry_home = trained.registry_root.parent / "registry"
    assert registry_home == trained.registry_root  # the CLI's default registry is KEEL_HOME/registry
    runner = CliRunner()
    args = ["eval", "pcb_inspection", "--data-dir", str(trained.list_file.parent), "--list", str(trained.list_file)]
    out = runner.invoke(build_cli(), args)
    assert out.exit_code == 0, out.output
    last = json.loads(out.output.strip().splitlines()[-1])
    assert last["app"] == "pcb_inspection" and "map50" in last["metrics"]
    bad = tmp_path / "bad.txt"
    bad.write_text(trained.list_file.read_text().splitlines()[0] + "\nonly-one-field\n")
    out = runner.invoke(build_cli(), [*args[:-1], str(bad)])
    assert out.exit_code == 1 and "bad.txt:2" in out.output


def test_random_split_and_recipes() -> None:
    assert RECIPES.names() == ["cpu", "demo", "gpu"]
    gpu = RECIPES.get("gpu")
    assert gpu.precision == "auto" and gpu.budget_s * (1 - gpu.stage2_frac) == 270.0  # stage 1 as measured on an H200
    with pytest.raises(ValueError, match="split must be"):
        PcbTrainConfig(split="boards")
    with pytest.raises(ValueError, match="budget_s"):
        PcbTrainConfig(budget_s=None, max_steps=-1)
    with pytest.raises(ValueError, match="template_dropout"):
        PcbTrainConfig(template_dropout=1.5)
    assert split_records([], split="none", holdout=0.2, seed=0) == ([], [])


def test_training_goes_on_from_a_registered_model_with_lineage(trained: Trained) -> None:
    registry = ModelRegistry(trained.registry_root)
    parent, parent_state = registry.load(trained.ref)
    cfg = PcbTrainConfig(list_file=str(trained.list_file), init=trained.ref, crop=32, batch_size=2, budget_s=None,
                         max_steps=1, lr=1e-9, precision="32", progress=False, register_as="pcb-finetuned",
                         registry_root=str(trained.registry_root))  # fmt: skip
    version, report = main(cfg)
    assert version.parent == parent.ref and version.config["train"]["init"] == trained.ref
    assert report["train"]["steps"] == 1 and version.config["net"] == parent.config["net"]
    _, state = registry.load(version.ref)
    stem = "backbone.conv1.0.weight"
    assert torch.allclose(state[stem].float(), parent_state[stem].float(), atol=1e-6)  # the parent's weights, not fresh


def test_a_second_stage_restarts_at_half_the_lr_with_same_pairs(
    trained: Trained, monkeypatch: pytest.MonkeyPatch, same_pair_shares: list[float]
) -> None:
    import apps.pcb_inspection.train as train_module

    seen: list[tuple[float, float]] = []  # (same_pair, lr) of each stage

    class Spy(train_module.TimeBudget):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            seen.append((same_pair_shares[-1], kwargs["lr"]))

    monkeypatch.setattr(train_module, "TimeBudget", Spy)
    cfg = PcbTrainConfig(list_file=str(trained.list_file), crop=32, batch_size=2, budget_s=2.0, stage2_frac=0.5,
                         lr=1e-3, precision="32", progress=False, register_as=None)  # fmt: skip
    _, report = main(cfg)
    assert seen == [(0.0, 1e-3), (0.25, 5e-4)]
    one, two = report["train"]["stages"]
    assert one["steps"] >= 1 and two["steps"] >= 1 and report["train"]["steps"] == one["steps"] + two["steps"]
    with pytest.raises(ValueError, match="stage2_frac"):
        PcbTrainConfig(budget_s=None, max_steps=10, stage2_frac=0.5)
    with pytest.raises(ValueError, match="stage2_frac"):
        PcbTrainConfig(stage2_frac=1.0)
    with pytest.raises(ValueError, match="same_pair"):
        PcbTrainConfig(same_pair=1.0)


def test_cli_arguments_map_to_the_config() -> None:
    cfg = _parse(["--recipe", "gpu", "--budget-s", "30", "--crop", "256", "--split", "random", "--register-as", "none"])
    assert cfg.budget_s == 30.0 and cfg.crop == 256 and cfg.split == "random" and cfg.register_as is None
    assert cfg.model == "pcb_det_r10"


def test_time_budget_schedule_warms_up_decays_and_stops() -> None:
    from types import SimpleNamespace

    from apps.pcb_inspection.train import TimeBudget

    budget = TimeBudget(lr=1.0, budget_s=None, max_steps=10, warmup_frac=0.2)
    group: dict[str, float] = {"lr": 0.0}
    trainer = SimpleNamespace(global_step=0, optimizers=[SimpleNamespace(param_groups=[group])], should_stop=False)
    trainer.callback_metrics = {}
    budget.on_train_start(trainer, None)  # type: ignore[arg-type]
    lrs = []
    for step in range(10):
        trainer.global_step = step
        budget.on_train_batch_start(trainer, None)  # type: ignore[arg-type]
        lrs.append(group["lr"])
        trainer.global_step = step + 1
        budget.on_train_batch_end(trainer, None)  # type: ignore[arg-type]
        assert trainer.should_stop == (step == 9)
    assert lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] < 0.05


def test_import_weights_registers_a_gpu_run(tmp_path: Path) -> None:
    import dataclasses

    import torch

    from apps.pcb_inspection.model import create_model, load_predictor
    from apps.pcb_inspection.train import import_weights

    model = create_model("pcb_det_tiny")
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    blob = {"state_dict": state, "net": dataclasses.asdict(model.cfg), "score_threshold": 0.25}
    torch.save(blob, tmp_path / "pcb_gpu_model.pt")
    (tmp_path / "pcb_gpu.json").write_text(json.dumps({"metrics": {"map50": 0.9, "map50_per_class": {}}}))
    mv = import_weights(tmp_path / "pcb_gpu_model.pt", registry_root=str(tmp_path / "reg"))
    assert mv.ref == "pcb_inspection@1" and "production" in mv.aliases and mv.metrics == {"map50": 0.9}
    predictor = load_predictor(*ModelRegistry(tmp_path / "reg").load("pcb_inspection@production"))
    assert predictor.score_threshold == 0.25
    assert _parse(["--import-weights", "x.pt"]) == "x.pt"


def test_keel_train_cli_registers_the_demo_recipe(trained: Trained) -> None:
    args = ["train", "pcb_inspection", "--recipe", "demo", "--list", str(trained.list_file), "--budget-s", "1"]
    out = CliRunner().invoke(build_cli(), [*args, "--precision", "32"])
    assert out.exit_code == 0, out.output
    last = json.loads(out.output.strip().splitlines()[-1])
    assert last["registered"] == "pcb_inspection@1" and last["split"] == "none" and last["n_train"] == 6
    assert ModelRegistry().get("pcb_inspection@production").config["train"]["budget_s"] == 1.0


def test_a_detector_trained_without_templates_never_gets_one(trained: Trained) -> None:
    cfg = PcbTrainConfig(list_file=str(trained.list_file), crop=32, batch_size=2, budget_s=None, max_steps=1,
                         template_dropout=1.0, precision="32", progress=False, register_as="pcb-test-only",
                         registry_root=str(trained.registry_root))  # fmt: skip
    version, report = main(cfg)
    assert report["scored_with_template"] is False
    registry = ModelRegistry(trained.registry_root)
    predictor = load_predictor(*registry.load(version.ref))
    assert not predictor.use_template
    records = read_list(trained.list_file)[:2]
    with_templates = detect_records(predictor, records)
    without = detect_records(predictor, records, with_template=False)
    for a, b in zip(with_templates, without, strict=True):  # a template passed in changes nothing
        assert np.array_equal(a.scores, b.scores) and np.array_equal(a.boxes, b.boxes)
    assert load_predictor(*registry.load(trained.ref)).use_template  # the usual model compares
