"""Grad-CAM saliency maps (Selvaraju et al., "Grad-CAM", ICCV 2017) and their PNG overlay.

The map is taken at the deepest backbone stage whose feature map is still at least 4x4 at the model's input
size (the last stage of EfficientNet-Lite0 is only 2x2 at 64 px: too coarse to show where in the lung the
evidence is). Gradients of the pneumonia logit, averaged over space, weight that stage's channels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from apps.medical.model import MedicalNet

__all__ = ["cam_stage", "gradcam", "overlay_png"]

_MIN_CAM_SIDE = 4


def cam_stage(net: MedicalNet) -> nn.Module:
    """The deepest stage of ``net.trunk`` whose output is at least 4x4 at the input size (found by a dry run)."""
    cached = getattr(net, "_cam_stage", None)
    if cached is not None:
        return cached
    sides: list[int] = []
    # A stage's output is its last module's (a conv followed by its norm is one stage).
    hooks = [s[-1].register_forward_hook(lambda m, i, o: sides.append(min(o.shape[-2:]))) for s in net.trunk.stages]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 1, net.cfg.input_size, net.cfg.input_size))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    ok = [i for i, side in enumerate(sides) if side >= _MIN_CAM_SIDE]
    stage = net.trunk.stages[ok[-1] if ok else len(sides) - 1][-1]
    object.__setattr__(net, "_cam_stage", stage)  # a plain attribute, not a registered submodule
    return stage


def gradcam(nets: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of the pneumonia logit for images (B, 1, H, W) in [0, 1] -> (B, H, W) in [0, 1].

    With several networks (an ensemble) their maps are averaged.
    """
    total = torch.zeros(x.shape[0], *x.shape[-2:])
    for net in nets:
        if not isinstance(net, MedicalNet):
            raise TypeError(f"Grad-CAM needs PyTorch MedicalNets, got {type(net).__name__}")
        acts: list[torch.Tensor] = []
        hook = cam_stage(net).register_forward_hook(lambda m, i, o, store=acts: store.append(o))
        try:
            with torch.enable_grad():
                logit = net(x.detach())
                (grads,) = torch.autograd.grad(logit.sum(), acts[0])
        finally:
            hook.remove()
        weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        cam = F.relu((weights * acts[0]).sum(1, keepdim=True)).detach()  # (B, 1, h, w)
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
        total += cam / peak
    return total / len(nets)


def _heat(v: np.ndarray) -> np.ndarray:
    """A blue-to-red colour ramp for values in [0, 1] -> (H, W, 3) floats."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], -1)


def overlay_png(image: np.ndarray, cam: np.ndarray, *, size: int = 256, alpha: float = 0.45) -> bytes:
    """The greyscale image (H, W) uint8 with the Grad-CAM map blended over it, as PNG bytes (size x size)."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    heat = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR))
    weight = alpha * (heat.astype(np.float32) / 255)[..., None]
    rgb = (1 - weight) * grey[..., None] + weight * _heat(heat.astype(np.float32) / 255)
    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
