"""Training through core.training.Trainer, registration with lineage, and `keel eval medical` (SPEC 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apps.medical.evaluate import evaluate
from apps.medical.train import MedicalTrainConfig, main
from core.registry import ModelRegistry
from tests.apps.medical.conftest import TINY


def test_training_registers_a_calibrated_model_that_learned(trained_registry: Path, synthetic_npz: Path) -> None:
    registry = ModelRegistry(trained_registry)
    version = registry.get("medical@production")
    assert version.config["kind"] == "medical" and version.architecture == "medicalnet:torchvision:resnet18"
    train = version.config["train"]
    assert train["n_fit"] + train["n_holdout"] == train["n_labelled"] == 160
    assert train["phases"][0]["finetune"]["steps"] > 0 and "warmup" not in train["phases"][0]  # random init
    assert version.config["calibration"]["temperature"] > 0
    result = evaluate("medical@production", synthetic_npz, "test", registry=registry)
    assert result["n"] == 80 and result["split"] == "test"
    assert result["metrics"]["auc"] > 0.9, result  # the toy lesions are easy: a model that trained finds them


def test_pretrained_training_warms_up_then_fine_tunes_with_lineage(synthetic_npz: Path, tmp_path: Path) -> None:
    cfg = {**TINY, "backbone": "efficientnet_lite0-imagenet", "pretrained": True, "input_size": 32}
    cfg.update(finetune_epochs=1, warmup_epochs=1, label_fraction=0.5, min_epoch_steps=2)
    version = main(MedicalTrainConfig(data_path=str(synthetic_npz), registry_root=str(tmp_path), **cfg))
    assert version.parent == "efficientnet_lite0-imagenet@1"  # imported on first use, recorded as the parent
    phases = version.config["train"]["phases"][0]
    assert phases["warmup"]["steps"] > 0 and phases["finetune"]["steps"] > 0
    assert version.config["net"]["arch_kwargs"] == {"bn_eps": 1e-3, "pad_type": "same"}
    assert version.config["train"]["n_labelled"] == 80


def test_a_label_fraction_with_one_class_left_is_refused(synthetic_npz: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot give training and held-out images of both classes"):
        main(MedicalTrainConfig(data_path=str(synthetic_npz), registry_root=str(tmp_path), label_fraction=0.005))


def test_keel_eval_cli_prints_the_contract_as_last_line(
    trained_registry: Path, synthetic_npz: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.cli import build_cli

    monkeypatch.setenv("KEEL_HOME", str(trained_registry.parent))
    (trained_registry.parent / "registry").symlink_to(trained_registry, target_is_directory=True)
    runner = CliRunner()
    out = runner.invoke(build_cli(), ["eval", "medical", "--data", str(synthetic_npz), "--split", "test"])
    assert out.exit_code == 0, out.output
    last = json.loads(out.output.strip().splitlines()[-1])
    assert last["app"] == "medical" and last["model"] == "medical@1" and last["n"] == 80
    for key in ("auc", "accuracy", "ece", "ece_uncalibrated"):
        assert 0.0 <= last["metrics"][key] <= 1.0
    out = runner.invoke(build_cli(), ["eval", "medical", "--data", str(synthetic_npz), "--split", "val"])
    assert out.exit_code == 1
    assert "no key val_images, val_labels" in out.output and "splits in the file: test, train" in out.output
    out = runner.invoke(build_cli(), ["eval", "medical", "--data", str(synthetic_npz), "--model", "medical@9"])
    assert out.exit_code == 1 and "medical@9" in out.output
    args = ["eval", "medical", "--data", str(synthetic_npz), "--split", "test", "--decision-prior", "1.5"]
    out = runner.invoke(build_cli(), args)
    assert out.exit_code == 1 and "decision prior must be in (0, 1)" in out.output


def test_the_decision_prior_moves_the_threshold_not_the_ranking(trained_registry: Path, synthetic_npz: Path) -> None:
    registry = ModelRegistry(trained_registry)
    cal = registry.get("medical@1").config["calibration"]
    assert cal["decision_prior"] == cal["train_prior"]  # by default no shift is assumed
    low = evaluate("medical@1", synthetic_npz, "test", registry=registry, decision_prior=0.05)["metrics"]
    high = evaluate("medical@1", synthetic_npz, "test", registry=registry, decision_prior=0.95)["metrics"]
    assert low["auc"] == high["auc"] and low["ece"] == high["ece"]
    assert low["sensitivity"] <= high["sensitivity"] and low["specificity"] >= high["specificity"]
    assert low["sensitivity"] < high["sensitivity"] or low["specificity"] > high["specificity"]
