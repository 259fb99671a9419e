"""Heterogeneous ensembles of registered models (apps/medical/ensemble.py) and `keel train medical --ensemble-of`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from apps.medical.data import load_split
from apps.medical.ensemble import assemble
from apps.medical.evaluate import evaluate
from apps.medical.model import MedicalPredictor, load_predictor
from apps.medical.train import MedicalTrainConfig, main
from core.registry import ModelRegistry
from tests.apps.medical.conftest import TINY


@pytest.fixture(scope="module")
def two_archs(synthetic_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A registry with a tiny ResNet-18 and a tiny EfficientNet-Lite0 (random init), trained on the same images."""
    root = tmp_path_factory.mktemp("medical_ensemble")
    refs = []
    for arch in ("torchvision:resnet18", "timm:efficientnet_lite0"):
        cfg = MedicalTrainConfig(data_path=str(synthetic_npz), registry_root=str(root), **{**TINY, "backbone": arch})
        refs.append(main(cfg).ref)
    return root, refs


def test_members_of_different_architectures_are_averaged_on_one_scale(two_archs: tuple, synthetic_npz: Path) -> None:
    root, refs = two_archs
    registry = ModelRegistry(root)
    alone = [assemble(registry, [ref], aliases=()) for ref in refs]  # each source recalibrated on its own
    both = assemble(registry, refs, aliases=())
    assert both.parent == refs[0] and both.config["ensemble"]["of"] == refs
    assert both.architecture == "medicalnet:torchvision:resnet18+timm:efficientnet_lite0"
    assert [n["architecture"] for n in both.config["nets"]] == ["torchvision:resnet18", "timm:efficientnet_lite0"]
    ensemble = load_predictor(*registry.load(both.ref))
    assert [type(n.trunk.body).__name__ for n in ensemble.nets] == ["Sequential", "EfficientNet"]
    images = load_split(synthetic_npz, "test").images[:16]
    prior = ensemble.train_prior
    expected = []  # each source's own calibrated balanced log-odds z / T + b - logit(prior), averaged
    for ref, version in zip(refs, alone, strict=True):
        source = load_predictor(*registry.load(ref))
        (cal,) = version.config["ensemble"]["source_calibration"]  # its temperature scaling alone
        expected.append(source.logits(images) / cal["temperature"] + cal["bias"] - math.log(prior / (1 - prior)))
    torch.testing.assert_close(ensemble.logits(images), torch.stack(expected).mean(0), rtol=1e-4, atol=1e-4)
    metrics = evaluate(both.ref, synthetic_npz, "test", registry=registry)["metrics"]
    assert metrics["auc"] > 0.9 and 0 <= metrics["ece"] <= 1


def test_one_source_is_recalibrated_for_test_time_augmentation(two_archs: tuple) -> None:
    root, refs = two_archs
    registry = ModelRegistry(root)
    version = assemble(registry, refs[:1], tta=2, aliases=())
    assert version.config["calibration"]["tta"] == 2 and version.config["recipe"]["tta"] == 2
    predictor = load_predictor(*registry.load(version.ref))
    assert predictor.tta == 2 and len(predictor.nets) == 1
    assert version.metrics["train_seconds"] == registry.get(refs[0]).metrics["train_seconds"]


def test_sources_trained_on_other_images_are_refused(two_archs: tuple) -> None:
    root, refs = two_archs
    registry = ModelRegistry(root)
    version, state = registry.load(refs[1])
    config = {**version.config, "recipe": {**version.config["recipe"], "seed": 1}}  # another held-out part
    other = registry.register("other", state, architecture=version.architecture, config=config)
    with pytest.raises(ValueError, match=r"different images \(seed: 1 vs 0\)"):
        assemble(registry, [refs[0], other.ref], aliases=())
    with pytest.raises(ValueError, match="at least one"):
        assemble(registry, [], aliases=())


def test_member_terms_need_one_value_per_network() -> None:
    net = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"one value per network \(1\), got 2 / 1"):
        MedicalPredictor([net], member_scale=[1.0, 2.0], member_shift=[0.0])  # type: ignore[list-item]


def test_keel_train_ensemble_of_registers_without_training(two_archs: tuple, monkeypatch, tmp_path: Path) -> None:
    from core.cli import build_cli

    root, refs = two_archs
    monkeypatch.setenv("KEEL_HOME", str(tmp_path))
    (tmp_path / "registry").symlink_to(root, target_is_directory=True)
    runner = CliRunner()
    out = runner.invoke(build_cli(), ["train", "medical", "--ensemble-of", ",".join(refs), "--tta", "1"])
    assert out.exit_code == 0, out.output
    registered = json.loads(out.output.strip().splitlines()[-1])["registered"]
    assert ModelRegistry(root).get("medical@production").ref == registered
    out = runner.invoke(build_cli(), ["train", "medical", "--ensemble-of", "medical@99"])
    assert out.exit_code == 1 and "medical@99" in out.output
