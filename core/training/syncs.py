"""Counting device-to-host synchronisations in training steps, on any device.

The host waits for the device whenever Python needs a tensor's value: ``.item()``, ``float(t)``,
``bool(t)`` / ``if t:``, a comparison chained in Python. Each of these reaches the device through one
operator, ``aten::_local_scalar_dense``; data-dependent shapes (``nonzero``, boolean masks) and copies
from an accelerator to the CPU wait too. ``torch.cuda.set_sync_debug_mode`` reports them on CUDA only;
:class:`HostSyncCounter` sees the operators on any device, so a CPU test can hold a training step to
zero syncs::

    counter = SyncsPerStep()
    Trainer(net, loss_fn=loss, callbacks=[counter]).train(data)
    counter.steps[3]          # the syncs of the 4th step, each with the innermost Keel frame that caused it
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSync", "HostSyncCounter", "SyncsPerStep"]

_CORE = str(Path(__file__).resolve().parents[1])  # .../core: frames there are Keel's own code
_ALWAYS_SYNC = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), float(), bool(), int()
    torch.ops.aten.nonzero.default,  # output shape depends on the values
    torch.ops.aten.masked_select.default,
    torch.ops.aten.equal.default,  # returns a Python bool
}
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


@dataclass(frozen=True)
class HostSync:
    """One operator that makes the host wait for the device."""

    op: str
    keel_frame: str | None  # "core/training/scaling.py:98 in optimizer_step", None when no Keel code is on the stack
    frame: str  # the innermost Python frame outside torch: who asked for the value

    def __str__(self) -> str:
        return f"{self.op} from {self.keel_frame or self.frame}"


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode recording every operator that synchronises host and device while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[HostSync] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _ALWAYS_SYNC or (func in _COPIES and _device_to_host(func, args, kwargs)):
            self.syncs.append(_describe(str(func.overloadpacket.__name__)))
        return func(*args, **kwargs)

    @property
    def keel_syncs(self) -> list[HostSync]:
        """The syncs with Keel code on the stack."""
        return [s for s in self.syncs if s.keel_frame is not None]


def _device_to_host(func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    if func is torch.ops.aten.copy_.default:
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
    src, device = args[0], kwargs.get("device")
    return src.device.type != "cpu" and device is not None and torch.device(device).type == "cpu"


def _describe(op: str) -> HostSync:
    frames = traceback.extract_stack()[:-2]
    keel = next((f for f in reversed(frames) if f.filename.startswith(_CORE)), None)
    outside_torch = next((f for f in reversed(frames) if "/torch/" not in f.filename), frames[-1])

    def fmt(f: traceback.FrameSummary) -> str:
        return f"{f.filename}:{f.lineno} in {f.name}"

    return HostSync(op, fmt(keel) if keel else None, fmt(outside_torch))


class SyncsPerStep(Callback):
    """Counts the syncs of each training step, from one batch start to the next (Lightning's whole loop).

    The steps are in ``steps`` (one list of :class:`HostSync` per step; the last step, which ends the
    fit, is not counted). Meant for tests and diagnosis: the dispatch mode slows every operator.
    """

    def __init__(self) -> None:
        self.steps: list[list[HostSync]] = []
        self._counter: HostSyncCounter | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._close()
        self._counter = HostSyncCounter()
        self._counter.__enter__()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    def _close(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.steps.append(self._counter.syncs)
            self._counter = None
