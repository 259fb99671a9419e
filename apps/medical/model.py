"""The X-ray classifier: a pretrained image backbone from the registry + a binary head, and its calibrated predictor.

EfficientNet-Lite0 (Tan & Le, "EfficientNet", 2019; the "-Lite" variant without squeeze-excitation and
with ReLU6) fine-tuned as in Kornblith et al., "Do Better ImageNet Models Transfer Better?" (2019). The
network takes greyscale images (B, 1, H, W) in [0, 1] of any size, upsamples them to its input size,
repeats the channel to RGB and normalises with the backbone's ImageNet statistics, so the 28x28
PneumoniaMNIST images, uploaded PNGs and the training batches all go through the same path.

Backbones (by architecture string, :data:`BACKBONES`): ``timm:<name>`` (e.g. ``timm:efficientnet_lite0``,
``timm:resnet50``) and ``torchvision:<name>`` (``torchvision:resnet18``, the plain baseline). Pretrained
weights come from the registry (``keel registry import``); the registered medical model holds the whole
fine-tuned network, so rebuilding it needs only the architecture string.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core.registry import ModelRegistry, ModelVersion, build_imported
from core.registry.importers import IMAGENET_MEAN, IMAGENET_STD
from core.utils.registry import Registry

__all__ = [
    "BACKBONES",
    "MedicalNet",
    "MedicalNetConfig",
    "MedicalPredictor",
    "build_net",
    "load_predictor",
    "pretrained_net",
]


@dataclass(frozen=True)
class MedicalNetConfig:
    """Architecture settings; saved in the registry entry."""

    architecture: str = "timm:efficientnet_lite0"  # "timm:<name>" or "torchvision:<name>"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. timm's bn_eps / pad_type of imported weights
    input_size: int = 64  # the 28x28 images are upsampled to this before the backbone
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dropout: float = 0.2


class Trunk(nn.Module):
    """A backbone without pooling or classifier: image (B, 3, H, W) -> feature map (B, C, h, w).

    ``stages`` lists its parameterised parts from input to output: the units of layer-wise learning
    rates and the candidates for the Grad-CAM layer.
    """

    def __init__(
        self,
        body: nn.Module,
        stages: list[tuple[nn.Module, ...]],
        features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.stages = stages  # views into body (a plain list, so nothing is registered twice)
        self.features = features  # e.g. timm's forward_features; None: body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) if self.features is not None else self.body(x)


def _stages(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    """Top-level children with parameters, ``blocks``/``stages`` expanded, a norm joined to the layer before it."""
    stages: list[tuple[nn.Module, ...]] = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if name in ("blocks", "stages") and isinstance(child, nn.Sequential):
            stages.extend((block,) for block in child)
        elif isinstance(child, nn.modules.batchnorm._NormBase) and stages:
            stages[-1] = (*stages[-1], child)
        else:
            stages.append((child,))
    return stages


BACKBONES: Registry[Callable[[str, dict[str, Any]], tuple[Trunk, int]]] = Registry("medical backbone family")


@BACKBONES.register("timm")
def _timm_trunk(name: str, kwargs: dict[str, Any]) -> tuple[Trunk, int]:
    import timm

    body: Any = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)  # timm's API is untyped
    return Trunk(body, _stages(body), body.forward_features), int(body.num_features)


@BACKBONES.register("torchvision")
def _torchvision_trunk(name: str, kwargs: dict[str, Any]) -> tuple[Trunk, int]:
    import torchvision

    body = torchvision.models.get_model(name, weights=None, **kwargs)
    if not hasattr(body, "fc"):
        raise ValueError(f"torchvision backbone {name!r} is not a ResNet-style model (no 'fc'); use a timm one")
    features = int(body.fc.in_features)
    body.fc = nn.Identity()
    parts = [body.conv1, body.bn1, body.relu, body.maxpool, body.layer1, body.layer2, body.layer3, body.layer4]
    seq = nn.Sequential(*parts)  # the unpooled feature map
    return Trunk(seq, _stages(seq)), features


class MedicalNet(nn.Module):
    """Greyscale image (B, 1, H, W) in [0, 1] -> pneumonia logit (B,)."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, cfg: MedicalNetConfig) -> None:
        super().__init__()
        family, _, name = cfg.architecture.partition(":")
        self.cfg = cfg
        self.trunk, width = BACKBONES.get(family)(name, dict(cfg.arch_kwargs))
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(width, 1))
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, 3, S, S) normalised, S = input_size."""
        size = self.cfg.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk(self.prepare(x))  # (B, C, h, w)
        return self.head(fmap.mean(dim=(2, 3))).squeeze(1)  # (B,)

    def param_groups(self, *, lr: float, head_lr: float, layer_decay: float) -> list[dict[str, Any]]:
        """Layer-wise rates: ``head_lr`` for the head, ``lr`` for the top stage, x ``layer_decay`` per stage down."""
        stages = self.trunk.stages
        groups = [{"params": list(self.head.parameters()), "lr": head_lr, "name": "head"}]
        for depth, stage in enumerate(reversed(stages)):
            params = [p for module in stage for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr * layer_decay**depth, "name": f"stage{len(stages) - depth}"})
        return groups

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (or unfreeze) the backbone; a frozen one also keeps its batch-norm statistics."""
        for p in self.trunk.parameters():
            p.requires_grad_(trainable)
        self.backbone_frozen = not trainable

    def train(self, mode: bool = True) -> MedicalNet:
        super().train(mode)
        if mode and getattr(self, "backbone_frozen", False):
            self.trunk.eval()  # frozen ImageNet statistics, not re-estimated on a few X-rays
        return self


def build_net(cfg: MedicalNetConfig) -> MedicalNet:
    return MedicalNet(cfg)


def pretrained_net(
    registry: ModelRegistry, ref: str, *, input_size: int, dropout: float
) -> tuple[MedicalNet, ModelVersion]:
    """A MedicalNet whose backbone carries the weights of an imported registry entry (``keel registry import``)."""
    version, state = registry.load(ref)
    backbone = build_imported(version, state, num_classes=0)
    inp = version.config["input"]
    cfg = MedicalNetConfig(
        architecture=f"timm:{version.config['timm_model']}",
        arch_kwargs=dict(version.config["timm_kwargs"]),
        input_size=input_size,
        mean=tuple(inp["mean"]),
        std=tuple(inp["std"]),
        dropout=dropout,
    )
    net = MedicalNet(cfg)
    net.trunk.body.load_state_dict(backbone.state_dict(), strict=True)
    return net, version


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class MedicalPredictor:
    """Calibrated, prior-aware predictions of one network or an ensemble (mean logit).

    The networks are trained on a class-balanced loss, so their logit ``z`` ideally carries no class
    prior. Temperature scaling (Guo et al. 2017) fitted on held-out training images gives probabilities
    for the training prior: ``p = sigmoid(z / T + b)``, with ``b = logit(train_prior)`` or, when enough
    images are held out, ``b`` fitted too (a short training leaves the logit off-centre; the fit corrects
    it). For another prevalence ``q`` the log-odds shift by ``logit(q) - logit(train_prior)`` (the prior-shift
    correction of Saerens et al. 2002 for a known new prior). The decision is made for ``decision_prior``,
    the prevalence where the model is used (default: the training prior, i.e. no shift): the Bayes decision
    ``p_q > 0.5`` with ``q = decision_prior``.

    Test-time augmentation: with ``tta = n`` the logit of an image is the mean over the image and ``n``
    augmented views of it (:func:`apps.medical.data.augment_batch` at ``tta_strength``, a fixed random
    stream, so the same batch always gives the same logits); the temperature must be fitted with the same
    ``tta`` (:func:`apps.medical.train.calibrate`).

    A heterogeneous ensemble (e.g. the pretrained Lite0 with a ResNet-18, :mod:`apps.medical.ensemble`) puts its
    members on one scale first: member ``i``'s logit becomes ``z_i * member_scale[i] + member_shift[i]`` (its own
    temperature scaling, to balanced log-odds) before the mean; default 1 and 0, the plain mean logit.
    """

    def __init__(
        self,
        nets: Sequence[nn.Module],
        *,
        temperature: float = 1.0,
        train_prior: float = 0.5,
        decision_prior: float | None = None,
        bias: float | None = None,
        batch_size: int = 256,
        tta: int = 0,
        tta_strength: float = 0.5,
        member_scale: list[float] | None = None,
        member_shift: list[float] | None = None,
    ) -> None:
        if not nets:
            raise ValueError("a predictor needs at least one network")
        self.member_scale = [1.0] * len(nets) if member_scale is None else [float(v) for v in member_scale]
        self.member_shift = [0.0] * len(nets) if member_shift is None else [float(v) for v in member_shift]
        if not len(self.member_scale) == len(self.member_shift) == len(nets):
            raise ValueError(
                f"member_scale / member_shift need one value per network ({len(nets)}), "
                f"got {len(self.member_scale)} / {len(self.member_shift)}"
            )
        if tta < 0:
            raise ValueError(f"tta must be >= 0 augmented views, got {tta}")
        self.nets = [n.eval() for n in nets]
        self.temperature = float(temperature)
        self.train_prior = float(train_prior)
        self.bias = _logit(self.train_prior) if bias is None else float(bias)
        self.decision_prior = self.train_prior if decision_prior is None else float(decision_prior)
        if not 0 < self.decision_prior < 1:
            raise ValueError(f"decision prior must be in (0, 1), got {self.decision_prior}")
        self.batch_size = batch_size
        self.tta, self.tta_strength = int(tta), float(tta_strength)

    @property
    def threshold(self) -> float:
        """The probability (for the training prior) above which the decision is pneumonia."""
        return 1 / (1 + math.exp(-(_logit(self.train_prior) - _logit(self.decision_prior))))

    def logits(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Uncalibrated ensemble logits for images (B, H, W) uint8 or (B, 1, H, W) float in [0, 1]."""
        from apps.medical.data import augment_batch

        x = _as_input(images)
        out = []
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for part in x.split(self.batch_size):
                views = [part] + [
                    augment_batch(part, generator=generator, strength=self.tta_strength) for _ in range(self.tta)
                ]
                members = zip(self.nets, self.member_scale, self.member_shift, strict=True)
                out.append(torch.stack([net(v) * a + c for net, a, c in members for v in views]).mean(0))
        return torch.cat(out) if out else torch.zeros(0)

    @property
    def supports_saliency(self) -> bool:
        """Grad-CAM needs PyTorch networks (an edge export on ONNX Runtime / TorchScript has no gradients)."""
        return all(isinstance(n, MedicalNet) for n in self.nets)

    @property
    def medical_nets(self) -> list[MedicalNet]:
        """The members as PyTorch :class:`MedicalNet` s (their configs, trunks); an edge export has none."""
        if not self.supports_saliency:
            raise TypeError("this predictor runs an exported (edge) model, not PyTorch MedicalNets")
        return [n for n in self.nets if isinstance(n, MedicalNet)]

    def calibrated(self, logits: torch.Tensor, *, prior: float | None = None) -> torch.Tensor:
        """P(pneumonia) for the training prior (or ``prior``), from uncalibrated logits."""
        shift = 0.0 if prior is None else _logit(prior) - _logit(self.train_prior)
        return torch.sigmoid(logits / self.temperature + self.bias + shift)

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        shift = _logit(self.decision_prior) - _logit(self.train_prior)
        return (logits / self.temperature + self.bias + shift > 0).long()

    def predict_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Serving: ``{"image": (H, W) uint8, "saliency": bool}`` -> probabilities, decision (and a Grad-CAM map)."""
        from apps.medical.saliency import gradcam

        if any(it.get("saliency") for it in items) and not self.supports_saliency:
            raise ValueError("saliency needs the PyTorch model; this predictor runs an exported (edge) model")
        logits = self.logits(np.stack([it["image"] for it in items]))
        probs = self.calibrated(logits)
        decisions = self.decide(logits)
        results = []
        for i, item in enumerate(items):
            p = float(probs[i])
            result: dict[str, Any] = {
                "probabilities": {"normal": 1 - p, "pneumonia": p},
                "decision": "pneumonia" if int(decisions[i]) else "normal",
                "threshold": self.threshold,
            }
            if item.get("saliency"):
                result["saliency"] = gradcam(self.nets, _as_input(item["image"][None]))[0].numpy()
            results.append(result)
        return results

    def registry_state(self) -> dict[str, Any]:
        return {
            "members": [{k: v.detach().cpu() for k, v in n.state_dict().items()} for n in self.nets],
            "calibration": {
                "temperature": self.temperature,
                "bias": self.bias,
                "train_prior": self.train_prior,
                "decision_prior": self.decision_prior,
                "tta": self.tta,
                "tta_strength": self.tta_strength,
                "member_scale": self.member_scale,
                "member_shift": self.member_shift,
            },
        }


def _as_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x[:, None]
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def load_predictor(version: ModelVersion, state: dict[str, Any]) -> MedicalPredictor:
    """Rebuilds the predictor of a registered medical model or edge export (the registry's ``load`` for serving)."""
    if version.config.get("kind") == "medical-edge":  # an exported variant (python -m apps.medical.edge)
        from apps.medical.edge import load_edge_predictor

        return load_edge_predictor(version, state)
    if version.config.get("kind") != "medical":
        raise ValueError(f"{version.ref} is not a medical model (config kind {version.config.get('kind')!r})")
    configs = version.config.get("nets") or [version.config["net"]] * len(state["members"])  # "nets": heterogeneous
    nets = []
    for member, net_cfg in zip(state["members"], configs, strict=True):
        net = MedicalNet(MedicalNetConfig(**{**net_cfg, "mean": tuple(net_cfg["mean"]), "std": tuple(net_cfg["std"])}))
        net.load_state_dict(member, strict=True)
        nets.append(net.eval())
    cal = state["calibration"]
    return MedicalPredictor(
        nets,
        temperature=float(cal["temperature"]),
        bias=float(cal["bias"]) if "bias" in cal else None,
        train_prior=float(cal["train_prior"]),
        decision_prior=float(cal["decision_prior"]),
        tta=int(cal.get("tta", 0)),
        tta_strength=float(cal.get("tta_strength", 0.5)),
        member_scale=cal.get("member_scale"),
        member_shift=cal.get("member_shift"),
    )


def net_config_dict(cfg: MedicalNetConfig) -> dict[str, Any]:
    return {**asdict(cfg), "mean": list(cfg.mean), "std": list(cfg.std)}
