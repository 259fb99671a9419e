"""MedicalNet over every backbone family, layer-wise learning rates, freezing, Grad-CAM and calibration."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from apps.medical.calibration import binary_metrics, expected_calibration_error, fit_temperature
from apps.medical.model import BACKBONES, MedicalNet, MedicalNetConfig, MedicalPredictor, pretrained_net
from apps.medical.saliency import cam_stage, gradcam, overlay_png
from core.registry import ModelRegistry, import_weights

ARCHS = {"timm": "timm:efficientnet_lite0", "torchvision": "torchvision:resnet18"}


def test_every_backbone_family_has_a_case() -> None:
    assert sorted(ARCHS) == BACKBONES.names()


@pytest.mark.parametrize("arch", sorted(ARCHS.values()))
def test_forward_backward_save_load(arch: str) -> None:
    torch.manual_seed(0)
    net = MedicalNet(MedicalNetConfig(architecture=arch, input_size=32))
    x = torch.rand(4, 1, 28, 28)
    logits = net(x)
    assert logits.shape == (4,)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    again = MedicalNet(net.cfg)
    again.load_state_dict(net.state_dict(), strict=True)
    torch.testing.assert_close(again.eval()(x), net.eval()(x))


def test_any_image_size_goes_through_the_same_path() -> None:
    net = MedicalNet(MedicalNetConfig(architecture=ARCHS["torchvision"], input_size=28)).eval()
    assert net(torch.rand(2, 1, 200, 150)).shape == (2,)


def test_layer_wise_learning_rates_cover_every_parameter_once() -> None:
    net = MedicalNet(MedicalNetConfig(architecture=ARCHS["timm"], input_size=32))
    groups = net.param_groups(lr=1e-3, head_lr=1e-2, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 1e-2
    lrs = [g["lr"] for g in groups[1:]]
    assert lrs[0] == 1e-3 and all(b == pytest.approx(a * 0.5) for a, b in zip(lrs, lrs[1:], strict=False))
    # the stem (conv + its batch norm) is the lowest group; the head conv + norm the highest
    assert len(groups) - 1 == len(net.trunk.stages) == 9


def test_a_frozen_backbone_keeps_its_batch_norm_statistics() -> None:
    net = MedicalNet(MedicalNetConfig(architecture=ARCHS["torchvision"], input_size=28))
    net.set_backbone_trainable(False)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net.train()
    assert not net.trunk.training and net.head.training
    net(torch.rand(8, 1, 28, 28)).sum().backward()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in net.trunk.parameters())
    net.set_backbone_trainable(True)
    assert net.train().trunk.training


def test_pretrained_net_carries_the_imported_weights(tmp_path) -> None:
    registry = ModelRegistry(tmp_path)
    version = import_weights("efficientnet-lite0", registry=registry)
    net, backbone = pretrained_net(registry, version.ref, input_size=32, dropout=0.0)
    _, state = registry.load(version.ref)
    assert backbone.ref == version.ref and net.cfg.mean == (0.5, 0.5, 0.5)
    torch.testing.assert_close(net.trunk.body.conv_stem.weight, state["conv_stem.weight"])
    assert net.cfg.arch_kwargs == {"bn_eps": 1e-3, "pad_type": "same"}


def test_gradcam_is_a_normalised_map_at_a_stage_of_at_least_4x4() -> None:
    net = MedicalNet(MedicalNetConfig(architecture=ARCHS["timm"], input_size=64)).eval()
    stage = cam_stage(net)
    assert stage is net.trunk.stages[5][-1]  # Lite0 at 64 px: blocks.4 (after the stem) is the last one at 4x4
    cam = gradcam([net], torch.rand(2, 1, 28, 28))
    assert cam.shape == (2, 28, 28) and cam.min() >= 0 and cam.max() <= 1 + 1e-6


def test_overlay_is_a_png() -> None:
    from PIL import Image

    png = overlay_png(np.zeros((28, 28), np.uint8), np.linspace(0, 1, 784).reshape(28, 28), size=64)
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"


def test_temperature_scaling_recovers_the_true_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    overconfident = 3.0 * true_logits
    t, b = fit_temperature(overconfident, labels)
    assert t == pytest.approx(3.0, rel=0.05) and b == 0.0
    before = expected_calibration_error(1 / (1 + np.exp(-overconfident)), labels)
    after = expected_calibration_error(1 / (1 + np.exp(-overconfident / t)), labels)
    assert after < 0.01 < 0.05 < before
    assert fit_temperature(overconfident, np.ones(20000), bias=0.3) == (1.0, 0.3)
    # an off-centre logit (as after a short training): the fitted bias takes the offset out
    t, b = fit_temperature(overconfident - 2.0, labels, fit_bias=True)
    assert t == pytest.approx(3.0, rel=0.05) and b == pytest.approx(2.0 / 3.0, abs=0.05)


def test_predictor_decision_follows_the_decision_prior() -> None:
    net = MedicalNet(MedicalNetConfig(architecture=ARCHS["torchvision"], input_size=28))
    balanced = MedicalPredictor([net], temperature=2.0, train_prior=0.75, decision_prior=0.5, bias=np.log(3.0))
    logits = torch.tensor([-0.5, 0.5])
    assert balanced.decide(logits).tolist() == [0, 1]
    probs = balanced.calibrated(logits)
    assert probs[0] > 0.5  # for the training prior (75%) a slightly negative logit is still pneumonia-leaning
    assert balanced.threshold == pytest.approx(0.75)  # logit 0 at the training prior
    metrics = binary_metrics(np.array([0, 1]), probs.numpy(), balanced.decide(logits).numpy())
    assert metrics["accuracy"] == 1.0 and metrics["auc"] == 1.0
    shifted = MedicalPredictor([net], temperature=2.0, train_prior=0.75, decision_prior=0.5, bias=np.log(3.0) + 1)
    assert shifted.decide(torch.tensor([-2.5, -1.5])).tolist() == [0, 1]  # a fitted bias moves the decision too


def test_em_recovers_a_shifted_prevalence_without_labels() -> None:
    from apps.medical.calibration import estimate_prior

    rng = np.random.default_rng(0)
    for prevalence in (0.6, 0.74, 0.9):
        y = rng.random(20000) < prevalence
        x = rng.normal(np.where(y, 1.0, -1.0), 1.0)  # log-likelihood ratio 2x
        probs = 1 / (1 + np.exp(-(2 * x + np.log(0.74 / 0.26))))  # calibrated for a 74% training prevalence
        assert estimate_prior(probs, 0.74) == pytest.approx(prevalence, abs=0.02)


def _prior_data(prevalence: float, n: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Labels and balanced logits (log-likelihood ratios) of a two-Gaussian problem at ``prevalence``."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(np.int64)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    return y, torch.from_numpy(2 * x)  # log p(x|1) / p(x|0) = 2x: a logit that carries no prior


def test_prior_shift_is_the_log_odds_offset_and_pays_under_shift() -> None:
    net = MedicalNet(MedicalNetConfig(architecture=ARCHS["torchvision"], input_size=28))
    predictor = MedicalPredictor([net], train_prior=0.74)  # bias: logit(0.74), the training prior
    assert predictor.decision_prior == 0.74 and predictor.threshold == pytest.approx(0.5)  # default: no shift
    y, z = _prior_data(0.4, 20000, seed=1)  # deployed where 40% are positive, trained at 74%
    at_train = predictor.calibrated(z)
    shifted = predictor.calibrated(z, prior=0.4)
    offset = np.log(0.4 / 0.6) - np.log(0.74 / 0.26)
    torch.testing.assert_close(torch.logit(shifted.double()), torch.logit(at_train.double()) + offset)
    # the corrected probabilities are calibrated at the new prior; the uncorrected ones are not
    assert expected_calibration_error(shifted.numpy(), y) < 0.02 < expected_calibration_error(at_train.numpy(), y)
    naive = predictor.decide(z).numpy()
    predictor.decision_prior = 0.4
    bayes = predictor.decide(z).numpy()
    assert (bayes == (shifted.numpy() > 0.5)).all() and (bayes == (at_train.numpy() > predictor.threshold)).all()
    assert (bayes == y).mean() > (naive == y).mean() + 0.02  # deciding for the stated prior is more accurate
    with pytest.raises(ValueError, match="decision prior must be in"):
        MedicalPredictor([net], train_prior=0.74, decision_prior=1.0)


def test_test_time_augmentation_is_deterministic_and_recorded() -> None:
    torch.manual_seed(0)
    net = MedicalNet(MedicalNetConfig(architecture=ARCHS["torchvision"], input_size=28))
    images = (np.random.default_rng(0).random((6, 28, 28)) * 255).astype(np.uint8)
    plain = MedicalPredictor([net]).logits(images)
    tta = MedicalPredictor([net], tta=3)
    first, again = tta.logits(images), tta.logits(images)
    torch.testing.assert_close(first, again)  # a fixed random stream
    assert not torch.allclose(first, plain)
    state = tta.registry_state()["calibration"]
    assert state["tta"] == 3 and state["tta_strength"] == tta.tta_strength
    with pytest.raises(ValueError, match="tta must be >= 0"):
        MedicalPredictor([net], tta=-1)
