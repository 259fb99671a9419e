"""Training through core.training.Trainer, registration with lineage, and `keel eval medical` (SPEC 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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


def test_balanced_bce_takes_soft_targets_as_the_mix_of_the_hard_ones() -> None:
    from apps.medical.train import balanced_bce

    logits = torch.tensor([0.3, -1.2, 2.0])
    y0, y1 = torch.zeros(3), torch.ones(3)
    hard = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(balanced_bce(logits, y1, pos_weight=0.5), hard(logits, y1) * 0.5 / 0.75)
    torch.testing.assert_close(balanced_bce(logits, y0, pos_weight=0.5), hard(logits, y0) / 0.75)
    mixed = balanced_bce(logits, torch.full((3,), 0.25), pos_weight=0.5)  # weight (0.25 * 0.5 + 0.75) / 0.75
    weight = torch.full((3,), (0.25 * 0.5 + 0.75) / 0.75)
    torch.testing.assert_close(mixed, hard(logits, torch.full((3,), 0.25), weight=weight))


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_mixup_mixes_images_and_labels_only_when_on(mixup: float) -> None:
    from apps.medical.model import MedicalNet, MedicalNetConfig
    from apps.medical.train import FineTuneModule

    torch.manual_seed(0)
    net = MedicalNet(MedicalNetConfig("torchvision:resnet18", input_size=28))
    module = FineTuneModule(
        net, [], pos_weight=1.0, augment=False, weight_decay=0.0, warmup_steps=0, total_steps=1, patience=1, mixup=mixup
    )
    seen: dict[str, torch.Tensor] = {}
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no Trainer here
    net.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    module._loss = lambda logits, y: seen.update(y=y) or logits.mean()  # type: ignore[method-assign]
    images = torch.cat([torch.zeros(4, 1, 28, 28), torch.full((4, 1, 28, 28), 255.0)]).to(torch.uint8)
    labels = torch.tensor([0.0] * 4 + [1.0] * 4)
    module.training_step((images, labels), 0)
    between = ((seen["y"] > 0) & (seen["y"] < 1)).any()
    assert bool(between) == (mixup > 0)  # soft labels only with mixup
    torch.testing.assert_close(seen["x"].amax(dim=(1, 2, 3)), seen["y"])  # black 0 / white 1: the same mix


def test_keel_train_medical_passes_the_recipe_options_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 96 px winner of the README is reproducible from the CLI: input size, epochs, patience and TTA arrive."""
    import apps.medical.train as train_module
    from core.cli import build_cli

    seen = {}

    class Registered:
        ref, metrics = "medical@1", {}

    def fake_main(cfg):  # noqa: ANN001, ANN202
        seen["cfg"] = cfg
        return Registered()

    monkeypatch.setattr(train_module, "main", fake_main)
    args = ["train", "medical", "--input-size", "96", "--finetune-epochs", "10", "--patience", "3", "--tta", "4"]
    out = CliRunner().invoke(build_cli(), args)
    assert out.exit_code == 0, out.output
    cfg = seen["cfg"]
    assert (cfg.input_size, cfg.finetune_epochs, cfg.patience, cfg.tta) == (96, 10, 3, 4)
    assert CliRunner().invoke(build_cli(), ["train", "medical", "--patience", "0"]).exit_code == 2
