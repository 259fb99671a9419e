"""``keel compress``: a registered timm model in, a new version with lineage out, rebuildable from the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from core.cli import build_cli
from core.compression.artifacts import rebuild
from core.registry import ModelRegistry

# int8 tensors are torch's quantized types, which torch says it will retire; loading them goes through TypedStorage
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning"),
]
FAST = ("--batch-sizes", "1", "--latency-repeats", "1", "--max-samples", "16")


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "reg")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=2)
    reg.register(
        "xray",
        model.state_dict(),
        architecture="timm:mobilenetv3_small_050",
        config={"model_kwargs": {}, "input": {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}},
        hparams={"num_classes": 2},
    )
    return reg


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    """MedMNIST layout: (N, 28, 28) uint8 greyscale images and (N, 1) labels."""
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 255, (24, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 2, (24, 1)),
        val_images=rng.integers(0, 255, (16, 28, 28), dtype=np.uint8),
        val_labels=rng.integers(0, 2, (16, 1)),
    )
    return path


def _run(*args: str) -> object:
    return CliRunner().invoke(build_cli(), ["compress", *args, *FAST])


def test_compress_chain_registers_a_child_that_rebuilds(registry: ModelRegistry, npz: Path) -> None:
    root = str(registry.root)
    result = _run(
        "xray", "-t", "channel_pruning", "-o", "pruning_rate=0.5", "-t", "static_int8", "--calibration-data", str(npz),
        "--root", root,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "registered xray@2 (parent xray@1)" in result.output
    mv, state = registry.load("xray@2")
    assert mv.parent == "xray@1"
    assert mv.architecture == "timm:mobilenetv3_small_050+channel_pruning+static_int8"
    assert mv.metrics["size_bytes"] < 0.2 * registry.get("xray@1").artifact_path.stat().st_size
    assert 0.0 <= mv.metrics["accuracy"] <= 1.0
    model = rebuild(mv.config, state)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 2)


def test_compress_a_compressed_version(registry: ModelRegistry, npz: Path) -> None:
    root = str(registry.root)
    assert _run("xray", "-t", "low_rank", "--calibration-data", str(npz), "--root", root).exit_code == 0
    result = _run("xray@2", "-t", "bf16", "--calibration-data", str(npz), "--root", root, "--val-split", "")
    assert result.exit_code == 0, result.output
    mv, state = registry.load("xray@3")
    assert mv.parent == "xray@2" and [s["technique"] for s in mv.config["chain"]] == ["low_rank", "bf16"]
    assert rebuild(mv.config, state)(torch.randn(1, 3, 32, 32)).dtype == torch.float32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "shrink"], "unknown compression technique 'shrink'"),
        (["-t", "distillation"], "trains a model"),
        (["-t", "qat"], "needs train_data"),
        (["-t", "channel_pruning", "-o", "rate=0.5"], "rate are taken by none"),
        (["-t", "channel_pruning", "--split", "test"], "no array 'test_images'"),
    ],
)
def test_bad_input_is_named(registry: ModelRegistry, npz: Path, args: list[str], message: str) -> None:
    result = _run("xray", *args, "--calibration-data", str(npz), "--root", str(registry.root))
    assert result.exit_code == 1
    assert message in result.output


def test_missing_model_and_file(registry: ModelRegistry, npz: Path, tmp_path: Path) -> None:
    root = str(registry.root)
    missing = _run("nope", "-t", "fp16", "--calibration-data", str(npz), "--root", root)
    assert missing.exit_code == 1 and "no model named 'nope'" in missing.output
    no_file = _run("xray", "-t", "fp16", "--calibration-data", str(tmp_path / "x.npz"), "--root", root)
    assert no_file.exit_code == 1 and "does not exist" in no_file.output
    (tmp_path / "junk.npz").write_text("not an archive")
    junk = _run("xray", "-t", "fp16", "--calibration-data", str(tmp_path / "junk.npz"), "--root", root)
    assert junk.exit_code == 1 and "junk.npz is not a readable .npz file" in junk.output
