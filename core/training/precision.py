"""Precision resolution: one pure function from (requested, device) to a decision with its reason.

``precision="auto"`` picks what an expert would pick by hand: bf16-mixed on CUDA GPUs with bf16
(Ampere, sm_80, and newer), fp16-mixed with dynamic loss scaling on older GPUs, fp32 on CPU unless
bf16 was measured faster there. Explicit requests the device cannot honour are downgraded, and the
reason says so (after Lightning's ``accelerator_connector.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.utils.registry import Registry

__all__ = ["DeviceInfo", "Precision", "PRECISIONS", "detect_device", "resolve_precision"]

# Every accepted spelling -> its canonical Lightning name. Unknown names list these in the error.
PRECISIONS: Registry[str] = Registry("precision")
for _canonical, _aliases in {
    "32-true": ("32", "fp32", "32-true"),
    "bf16-mixed": ("bf16", "bf16-mixed"),
    "16-mixed": ("16", "fp16", "16-mixed"),
    "bf16-true": ("bf16-true",),
    "auto": ("auto",),
}.items():
    for _alias in _aliases:
        PRECISIONS.add(_alias, _canonical)


@dataclass(frozen=True)
class DeviceInfo:
    """What precision resolution needs to know about the training device.

    Attributes:
        type: ``"cpu"``, ``"cuda"`` or ``"mps"``.
        name: human-readable device name.
        capability: CUDA compute capability ``(major, minor)``; None off CUDA.
        bf16_supported: the device computes in bf16 natively.
        cpu_bf16_faster: bf16 autocast was measured faster than fp32 on this CPU.
    """

    type: str = "cpu"
    name: str = "cpu"
    capability: tuple[int, int] | None = None
    bf16_supported: bool = False
    cpu_bf16_faster: bool = False


@dataclass(frozen=True)
class Precision:
    """A resolved precision: the Lightning name to train with and why it was chosen."""

    name: str
    requested: str
    reason: str

    @property
    def is_fp16(self) -> bool:
        """fp16 gradients underflow without loss scaling."""
        return self.name == "16-mixed"


def detect_device(accelerator: str = "auto") -> DeviceInfo:
    """Describe the device Lightning will train on for ``accelerator`` ("auto", "cpu", "cuda"/"gpu")."""
    if accelerator not in ("auto", "cpu", "cuda", "gpu"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'cuda' or 'gpu', got {accelerator!r}")
    if accelerator != "cpu" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(0)
        return DeviceInfo(type="cuda", name=torch.cuda.get_device_name(0), capability=cap, bf16_supported=cap >= (8, 0))
    if accelerator in ("cuda", "gpu"):
        raise RuntimeError(f"accelerator={accelerator!r} was requested but torch sees no CUDA device")
    return DeviceInfo(type="cpu", name="cpu", bf16_supported=True)


def resolve_precision(requested: str, device: DeviceInfo) -> Precision:
    """Resolve a precision request for a device (pure: no device queries, no side effects).

    Args:
        requested: ``"auto"`` or one of ``PRECISIONS.names()`` ("32", "bf16", "bf16-mixed", "16-mixed", ...).
        device: the device description (tests pass fakes).

    Returns:
        The decision and a one-line human reason.

    Raises:
        UnknownNameError: ``requested`` is not a known precision (the message lists the known ones).
    """
    canonical = PRECISIONS.get(str(requested).strip().lower())
    if canonical == "auto":
        name, reason = _auto(device)
        return Precision(name, requested, reason)
    on_cuda_without_bf16 = device.type == "cuda" and not device.bf16_supported
    if canonical in ("bf16-mixed", "bf16-true") and on_cuda_without_bf16:
        why = f"{device.name} (sm_{_sm(device)}) has no bf16; downgraded {requested!r} to 16-mixed with loss scaling"
        return Precision("16-mixed", requested, why)
    if canonical == "16-mixed" and device.type == "cpu":
        why = f"fp16 autocast is not supported for training on CPU; downgraded {requested!r} to 32-true"
        return Precision("32-true", requested, why)
    return Precision(canonical, requested, f"{canonical} requested explicitly on {device.type} ({device.name})")


def _auto(device: DeviceInfo) -> tuple[str, str]:
    if device.type == "cuda":
        if device.bf16_supported:
            return "bf16-mixed", f"auto: {device.name} (sm_{_sm(device)}) computes bf16 natively; no loss scale needed"
        return "16-mixed", f"auto: {device.name} (sm_{_sm(device)}) lacks bf16; fp16 mixed with dynamic loss scaling"
    if device.type == "cpu" and device.cpu_bf16_faster:
        return "bf16-mixed", "auto: bf16 autocast was measured faster than fp32 on this CPU"
    return "32-true", f"auto: {device.type} trains in fp32 (bf16 not measured faster here)"


def _sm(device: DeviceInfo) -> str:
    return "".join(map(str, device.capability)) if device.capability else "?"
