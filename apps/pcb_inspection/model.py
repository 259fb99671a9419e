"""PcbDetector: a template-aware, anchor-free (CenterNet-style) defect detector on a timm backbone with an FPN.

Heads after "Objects as Points" (Zhou et al., 2019): a per-class centre heatmap, box size and sub-cell offset at
stride 4, decoded with a 3x3 max-pool; elliptical Gaussian targets after TTFNet (Liu et al., 2020). A class-wise
NMS over the peaks (IoU 0.5) then drops the second peak a large or elongated defect sometimes gets two or more
cells from the first, which the 3x3 max-pool cannot see.
The backbone is any timm ``features_only`` model; its stride-4..32 features are merged top-down (an FPN, Lin et
al., 2017) back to stride 4, where DeepPCB's 20-170 px defects are 5-40 cells wide.

Template awareness is early fusion: the test image and its template are two input channels (values -1/+1), so
the first convolutions compare them pixel by pixel; trained with random template shifts, the comparison learns to
tolerate misregistration that breaks plain image differencing (tangsanli5201/DeepPCB#7). A template channel of
zeros means "no template" (trained with template dropout), so the service can inspect a test image alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss

from apps.pcb_inspection.data import CLASSES, binarize
from core.lite import LiteModel
from core.utils.registry import Registry

__all__ = [
    "INPUT_NAME",
    "MODELS",
    "OUTPUT_NAMES",
    "Detections",
    "Detector",
    "LiteDetector",
    "PcbDetector",
    "PcbDetectorConfig",
    "PcbPredictor",
    "create_model",
    "decode",
    "detection_loss",
    "load_predictor",
    "to_input",
]

STRIDE = 4
#: Input and output names of an exported detector (see :mod:`apps.pcb_inspection.edge`).
INPUT_NAME = "pair"
OUTPUT_NAMES = ("heatmap", "size", "offset")


@dataclass(frozen=True)
class PcbDetectorConfig:
    """Architecture of a :class:`PcbDetector`."""

    backbone: str = "resnet10t"  # any timm model with features_only and strides 4..32
    fpn_channels: int = 96
    head_channels: int = 64
    num_classes: int = len(CLASSES)
    max_detections: int = 100  # kept per image before score thresholds
    nms_iou: float | None = 0.5  # class-wise NMS over the decoded peaks; None: peaks only (CenterNet's decoding)


class _Fpn(nn.Module):
    """Top-down merge of stride 4..32 features into one stride-4 map (B, C, H/4, W/4)."""

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](feats[-1])  # (B, C, H/32, W/32)
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1]), strict=True):
            x = lateral(f) + F.interpolate(x, size=f.shape[-2:], mode="nearest")
        return self.smooth(x)  # (B, C, H/4, W/4)


class PcbDetector(nn.Module):
    """Input (B, 2, H, W) float (test, template; -1/+1, template 0 = none), H and W multiples of 32.

    Returns ``(heatmap logits (B, K, H/4, W/4), size (B, 2, H/4, W/4) in cells, offset (B, 2, H/4, W/4))``.
    """

    def __init__(self, cfg: PcbDetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.hparams = asdict(cfg)
        backbone: Any = timm.create_model(cfg.backbone, features_only=True, in_chans=2, pretrained=False)  # untyped
        self.backbone = backbone
        reductions = backbone.feature_info.reduction()
        self.levels = [reductions.index(r) for r in (4, 8, 16, 32)]
        channels = backbone.feature_info.channels()
        self.fpn = _Fpn([channels[i] for i in self.levels], cfg.fpn_channels)
        c, h = cfg.fpn_channels, cfg.head_channels
        self.trunk = nn.Sequential(nn.Conv2d(c, h, 3, padding=1, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True))
        self.heatmap = nn.Conv2d(h, cfg.num_classes, 1)
        assert self.heatmap.bias is not None  # Conv2d's default bias=True
        self.size = nn.Conv2d(h, 2, 1)
        self.offset = nn.Conv2d(h, 2, 1)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01: stable focal loss start

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        t = self.trunk(self.fpn([feats[i] for i in self.levels]))  # (B, h, H/4, W/4)
        return self.heatmap(t), F.softplus(self.size(t)), self.offset(t).sigmoid()


def to_input(images: torch.Tensor, has_template: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 2, H, W) {0, 1} -> float -1/+1 model input; template channel zeroed where ``has_template`` is False."""
    x = images.float() * 2 - 1
    if has_template is not None:
        x[:, 1] *= has_template.to(x.dtype).view(-1, 1, 1)
    return x


def _targets(boxes: torch.Tensor, classes: torch.Tensor, shape: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Gaussian centre heatmaps (B, K, h, w) for boxes (B, M, 4) in pixels, classes (B, M) (-1 = padding)."""
    b, m = classes.shape
    h, w = shape
    valid = classes >= 0
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / (2 * STRIDE), (boxes[..., 1] + boxes[..., 3]) / (2 * STRIDE)
    # TTFNet's elliptical Gaussian: sigma = 0.54 * side / 6, peaking at the centre's cell.
    sx = ((boxes[..., 2] - boxes[..., 0]) / STRIDE * 0.09).clamp(min=0.5)  # (B, M)
    sy = ((boxes[..., 3] - boxes[..., 1]) / STRIDE * 0.09).clamp(min=0.5)
    ix, iy = cx.floor().clamp(0, w - 1), cy.floor().clamp(0, h - 1)
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype).view(1, 1, 1, w)
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype).view(1, 1, h, 1)
    g = torch.exp(
        -((xs - ix[..., None, None]) ** 2) / (2 * sx[..., None, None] ** 2)
        - ((ys - iy[..., None, None]) ** 2) / (2 * sy[..., None, None] ** 2)
    )  # (B, M, h, w)
    heat = boxes.new_zeros(b, num_classes, h, w)
    for k in range(num_classes):
        mask = (valid & (classes == k)).to(g.dtype)[..., None, None]
        heat[:, k] = (g * mask).amax(dim=1) if m else heat[:, k]
    return heat


def detection_loss(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    boxes: torch.Tensor,
    classes: torch.Tensor,
    *,
    giou_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CenterNet loss: penalty-reduced focal loss on the heatmap + L1 on size (x0.1) and offset at box centres,
    plus, with ``giou_weight``, a GIoU loss (Rezatofighi et al., 2019) on the box decoded at each centre (TTFNet's
    box loss, at the centre only), which ties size and offset to the overlap that mAP@0.5 measures.

    Args:
        outputs: the model's ``(heatmap logits, size, offset)``.
        boxes: (B, M, 4) target boxes in input pixels.
        classes: (B, M) class indices, -1 for padding.
        giou_weight: weight of the GIoU term (0: none, the plain CenterNet loss).
    """
    logits, size, offset = (o.float() for o in outputs)
    _, k, h, w = logits.shape
    heat = _targets(boxes.float(), classes, (h, w), k)
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos)).sum()
    valid = classes >= 0
    n_pos = valid.sum().clamp(min=1).float()
    bi, mi = valid.nonzero(as_tuple=True)
    bx = boxes[bi, mi].float()  # (P, 4)
    cx, cy = (bx[:, 0] + bx[:, 2]) / (2 * STRIDE), (bx[:, 1] + bx[:, 3]) / (2 * STRIDE)
    ix, iy = cx.floor().clamp(0, w - 1).long(), cy.floor().clamp(0, h - 1).long()
    wh_target = torch.stack([(bx[:, 2] - bx[:, 0]) / STRIDE, (bx[:, 3] - bx[:, 1]) / STRIDE], dim=1)
    off_target = torch.stack([cx - ix, cy - iy], dim=1)
    size_at, off_at = size[bi, :, iy, ix], offset[bi, :, iy, ix]  # (P, 2) each
    size_loss = F.l1_loss(size_at, wh_target, reduction="sum") / n_pos
    off_loss = F.l1_loss(off_at, off_target, reduction="sum") / n_pos
    focal = (pos_loss + neg_loss) / n_pos
    total = focal + 0.1 * size_loss + off_loss
    parts = {"focal": focal.detach(), "size": size_loss.detach(), "offset": off_loss.detach()}
    if giou_weight:
        centre = (torch.stack([ix, iy], dim=1).float() + off_at) * STRIDE
        pred = torch.cat([centre - size_at * STRIDE / 2, centre + size_at * STRIDE / 2], dim=1)
        giou_loss = generalized_box_iou_loss(pred, bx, reduction="sum") / n_pos
        total = total + giou_weight * giou_loss
        parts["giou"] = giou_loss.detach()
    return total, parts


@dataclass
class Detections:
    """Detections of one image: boxes (N, 4) x1,y1,x2,y2 pixels, scores (N,), classes (N,) indices."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def above(self, threshold: float) -> Detections:
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])


@torch.no_grad()
def decode(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, k: int = 100, nms_iou: float | None = None
) -> list[Detections]:
    """Model outputs -> the ``k`` best peaks per image (3x3 max-pool peak picking), then, with ``nms_iou``, a
    class-wise NMS over them (best score first)."""
    # contiguous(): a channels-last model (GPU) returns NHWC-strided maps.
    logits, size, offset = (o.float().contiguous() for o in outputs)
    b, n_cls, h, w = logits.shape
    heat = logits.sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, idx = peaks.reshape(b, -1).topk(min(k, n_cls * h * w))  # (B, k)
    cls, cell = idx // (h * w), idx % (h * w)
    ys, xs = (cell // w).float(), (cell % w).float()
    gather = lambda t: t.reshape(b, 2, -1).gather(2, cell.unsqueeze(1).expand(-1, 2, -1))  # noqa: E731
    wh, off = gather(size), gather(offset)  # (B, 2, k)
    cx, cy = (xs + off[:, 0]) * STRIDE, (ys + off[:, 1]) * STRIDE
    bw, bh = wh[:, 0] * STRIDE, wh[:, 1] * STRIDE
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=2)  # (B, k, 4)
    out = []
    for i in range(b):
        keep = slice(None) if nms_iou is None else batched_nms(boxes[i], scores[i], cls[i], nms_iou)
        out.append(Detections(boxes[i, keep].cpu().numpy(), scores[i, keep].cpu().numpy(), cls[i, keep].cpu().numpy()))
    return out


MODELS: Registry[Callable[[], PcbDetectorConfig]] = Registry("pcb_inspection model")


@MODELS.register("pcb_det_tiny")
def _tiny() -> PcbDetectorConfig:
    """For unit tests and CPU training: resnet10t, narrow FPN and head (dense convolutions train fastest on a CPU)."""
    return PcbDetectorConfig(backbone="resnet10t", fpn_channels=48, head_channels=32)


@MODELS.register("pcb_det_r10")
def _r10() -> PcbDetectorConfig:
    """The full model: resnet10t, 96-channel FPN (5.3 M parameters, 10.6 MB in fp16)."""
    return PcbDetectorConfig(backbone="resnet10t", fpn_channels=96, head_channels=64)


@MODELS.register("pcb_det_r18")
def _r18() -> PcbDetectorConfig:
    """A wider backbone: resnet18, 128-channel FPN (11.6 M parameters)."""
    return PcbDetectorConfig(backbone="resnet18", fpn_channels=128, head_channels=64)


def create_model(name: str, **overrides: Any) -> PcbDetector:
    """Builds a registered variant by name; ``overrides`` replace fields of its config."""
    return PcbDetector(replace(MODELS.get(name)(), **overrides))


def _pad32(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % 32, 0, -h % 32))


class Detector(Protocol):
    """What :class:`PcbPredictor` runs: a :class:`PcbDetector` or an export of one (:class:`LiteDetector`)."""

    cfg: PcbDetectorConfig

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def eval(self) -> Any: ...


class LiteDetector:
    """An exported :class:`PcbDetector` (ONNX Runtime or TorchScript, through :class:`core.lite.LiteModel`) with the
    PyTorch model's call signature, so decoding and thresholds stay the ones of the fp32 path.

    Args:
        lite: the loaded export; its input must be :data:`INPUT_NAME` and its outputs :data:`OUTPUT_NAMES`.
        cfg: the architecture it was exported from (``max_detections`` is used by decoding).
    """

    def __init__(self, lite: LiteModel, cfg: PcbDetectorConfig) -> None:
        if lite.meta.inputs != [INPUT_NAME] or lite.meta.outputs != list(OUTPUT_NAMES):
            raise ValueError(
                f"not a PCB detector export: inputs {lite.meta.inputs}, outputs {lite.meta.outputs}; expected "
                f"[{INPUT_NAME!r}] and {list(OUTPUT_NAMES)} (export it with apps.pcb_inspection.edge)"
            )
        self.lite = lite
        self.cfg = cfg

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.lite.predict({INPUT_NAME: x.detach().cpu().float().numpy()})
        heat, size, offset = (torch.from_numpy(out[name]) for name in OUTPUT_NAMES)
        return heat, size, offset

    def eval(self) -> LiteDetector:
        return self


@dataclass
class PcbPredictor:
    """Batched inference for the service and evaluation: binarise, fuse, detect, decode, threshold.

    Attributes:
        model: the detector (eval mode), PyTorch or an export (:class:`LiteDetector`).
        score_threshold: detections below it are dropped by :meth:`predict_batch`.
        device: where the model runs.
        use_template: False for a detector trained without templates (``template_dropout=1.0``): it is never
            given one, so a template passed in changes nothing.
    """

    model: Detector
    score_threshold: float = 0.3
    device: torch.device | str = "cpu"
    use_template: bool = True

    @torch.no_grad()
    def detect(self, images: torch.Tensor, has_template: torch.Tensor) -> list[Detections]:
        """(B, 2, H, W) {0,1} pairs, (B,) bool -> every decoded peak per image (no threshold), in input pixels."""
        h, w = images.shape[-2:]
        if not self.use_template:
            has_template = torch.zeros_like(has_template)
        x = _pad32(to_input(images.to(self.device), has_template.to(self.device)))
        cfg = self.model.cfg
        dets = decode(self.model(x), k=cfg.max_detections, nms_iou=cfg.nms_iou)
        for d in dets:
            d.boxes[:, [0, 2]] = d.boxes[:, [0, 2]].clip(0, w)
            d.boxes[:, [1, 3]] = d.boxes[:, [1, 3]].clip(0, h)
        return dets

    def predict_batch(self, items: list[tuple[np.ndarray, np.ndarray | None]]) -> list[list[dict[str, Any]]]:
        """Items ``(test grey (H, W), template grey (H, W) or None)`` -> boxes with class names and scores."""
        out: list[list[dict[str, Any]]] = [[] for _ in items]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (test, _) in enumerate(items):
            by_shape.setdefault(test.shape, []).append(i)
        for idx in by_shape.values():  # one forward pass per image size
            pairs = []
            for i in idx:
                test, template = items[i]
                pairs.append(np.stack([binarize(test), binarize(template if template is not None else test)]))
            has = torch.tensor([items[i][1] is not None for i in idx])
            for i, d in zip(idx, self.detect(torch.from_numpy(np.stack(pairs)), has), strict=True):
                d = d.above(self.score_threshold)
                out[i] = [
                    {"box": [round(float(v), 1) for v in b], "class": CLASSES[int(c)], "score": round(float(s), 4)}
                    for b, s, c in zip(d.boxes, d.scores, d.classes, strict=True)
                ]
        return out


def load_predictor(version: Any, state: dict[str, Any], *, threads: int | None = None) -> PcbPredictor:
    """Rebuilds the predictor from a registry entry (``ModelRegistry.load(ref)`` returns both arguments).

    A PyTorch version runs in PyTorch; an edge export (architecture ``lite.onnx`` / ``lite.torchscript``, registered
    by :mod:`apps.pcb_inspection.edge`) runs in :class:`core.lite.LiteModel` with ``threads`` intra-op threads.
    """
    cfg = version.config
    net = PcbDetectorConfig(**cfg["net"])
    threshold = float(cfg.get("score_threshold", 0.3))
    use_template = float(cfg.get("train", {}).get("template_dropout", 0.0)) < 1.0  # see PcbPredictor
    if str(version.architecture).startswith("lite."):
        lite = LiteDetector(LiteModel.from_state(version, state, threads=threads), net)
        return PcbPredictor(lite, threshold, use_template=use_template)
    model = PcbDetector(net)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return PcbPredictor(model.eval(), score_threshold=threshold, use_template=use_template)
