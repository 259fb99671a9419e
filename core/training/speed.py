"""Speed defaults (SPEC 2.1): the switches an expert flips by hand, decided in one pure function and logged.

The Trainer resolves a :class:`SpeedConfig` against the device and the model into a :class:`SpeedPlan`
(:func:`resolve_speed`, pure: tests pass fake devices), logs one line per decision with its reason, and
applies it: TF32 matmuls/convolutions and cuDNN autotuning for the duration of the fit, channels-last
weights and inputs for conv nets, fused AdamW, and ``torch.compile`` of the model. bf16 autocast is the
precision's job (``precision="auto"``, see :mod:`core.training.precision`).

Every field of :class:`SpeedConfig` is ``None`` (Keel decides), ``True`` (force on) or ``False`` (off)::

    Trainer(net, loss_fn=..., speed=SpeedConfig(compile=False))   # everything else stays automatic
    Trainer(net, loss_fn=..., speed=SpeedConfig.off())            # plain PyTorch behaviour

:class:`ThroughputMeter` is the callback that times Lightning steps after a warm-up (device-synchronised
only at window edges, so it does not slow the run it measures).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from core.training.precision import DeviceInfo

__all__ = [
    "SPEED_SWITCHES",
    "SpeedConfig",
    "SpeedDecision",
    "SpeedPlan",
    "ThroughputMeter",
    "ThroughputWindow",
    "backend_flags",
    "channels_last_batch",
    "is_conv_net",
    "prepare_model",
    "resolve_speed",
]

log = logging.getLogger(__name__)

SPEED_SWITCHES = ("tf32", "cudnn_benchmark", "channels_last", "fused_adamw", "compile")
_COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SpeedConfig:
    """Which speed defaults the Trainer may apply. ``None``: Keel decides from the device; True/False: forced.

    Attributes:
        tf32: TF32 tensor-core matmuls and convolutions for fp32 math (CUDA, sm_80+).
        cudnn_benchmark: let cuDNN time its convolution algorithms on the first batch (conv nets on CUDA;
            pays off when input shapes repeat, as they do with a fixed batch size).
        channels_last: NHWC weights and image batches (conv nets on CUDA and CPU: what tensor cores and
            oneDNN read fastest).
        fused_adamw: the single-kernel AdamW for Keel's own optimizer (CUDA and CPU; on a 2-core CPU it
            measured ~4.7x faster than the default multi-tensor AdamW on 24M parameters).
        compile: ``torch.compile`` the model in place (CUDA, sm_70+; on CPU only when forced).
        compile_mode: passed to ``torch.compile`` (None: its default).
    """

    tf32: bool | None = None
    cudnn_benchmark: bool | None = None
    channels_last: bool | None = None
    fused_adamw: bool | None = None
    compile: bool | None = None
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        for name in SPEED_SWITCHES:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"SpeedConfig.{name} must be None (auto), True or False, got {value!r}")
        if self.compile_mode not in _COMPILE_MODES:
            raise ValueError(f"SpeedConfig.compile_mode must be one of {_COMPILE_MODES}, got {self.compile_mode!r}")

    @classmethod
    def off(cls) -> SpeedConfig:
        """Every speed default off: the model trains as plain PyTorch + Lightning would."""
        return cls(tf32=False, cudnn_benchmark=False, channels_last=False, fused_adamw=False, compile=False)


@dataclass(frozen=True)
class SpeedDecision:
    """One speed switch, whether it is on, and why."""

    name: str
    enabled: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.name}={'on' if self.enabled else 'off'} ({self.reason})"


@dataclass(frozen=True)
class SpeedPlan:
    """The resolved speed switches, in :data:`SPEED_SWITCHES` order."""

    decisions: tuple[SpeedDecision, ...]
    compile_mode: str | None = None

    def enabled(self, name: str) -> bool:
        """Whether switch ``name`` is on (KeyError for an unknown name)."""
        for d in self.decisions:
            if d.name == name:
                return d.enabled
        raise KeyError(f"no speed switch {name!r}; known: {', '.join(SPEED_SWITCHES)}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe summary (saved in checkpoints and registry entries with the run config)."""
        out: dict[str, Any] = {d.name: d.enabled for d in self.decisions}
        out["compile_mode"] = self.compile_mode
        return out

    def log(self) -> None:
        for d in self.decisions:
            log.info("speed: %s", d)


def resolve_speed(config: SpeedConfig, device: DeviceInfo, *, conv_net: bool) -> SpeedPlan:
    """Decide each speed switch for a device and model (pure: no device queries, no side effects).

    Args:
        config: the user's wishes (None fields are decided here).
        device: the training device (tests pass fakes).
        conv_net: the model has 2-D convolutions (channels-last and cuDNN autotuning only help those).

    Returns:
        One decision per switch, with a one-line reason.
    """
    if not isinstance(config, SpeedConfig):
        raise TypeError(f"speed must be a SpeedConfig (e.g. SpeedConfig(compile=False)), got {type(config).__name__}")
    cuda, cpu = device.type == "cuda", device.type == "cpu"
    cap = device.capability or (0, 0)
    where = f"{device.name} (sm_{cap[0]}{cap[1]})" if cuda else device.type
    tensor_cores, triton = cuda and cap >= (8, 0), cuda and cap >= (7, 0)
    auto = {
        "tf32": (tensor_cores, f"{where}: fp32 matmuls/convs on TF32 tensor cores")
        if tensor_cores
        else (False, f"{where} has no TF32 tensor cores"),
        "cudnn_benchmark": _conv_only(conv_net, cuda, where, "cuDNN times its conv algorithms once per input shape")
        if cuda
        else (False, f"{where}: cuDNN autotuning is CUDA only"),
        "channels_last": _conv_only(
            conv_net, cuda or cpu, where, "NHWC is the layout tensor cores and oneDNN read fastest"
        ),
        "fused_adamw": (True, f"{where}: one kernel for the whole AdamW update instead of several passes")
        if cuda or cpu
        else (False, f"{where}: no fused AdamW kernel assumed here"),
        "compile": _compile(triton, device.c_compiler, where),
    }
    decisions = []
    for name in SPEED_SWITCHES:
        wanted = getattr(config, name)
        on, reason = auto[name]
        if wanted is False:
            on, reason = False, "switched off by SpeedConfig"
        elif wanted is True and not on:
            on, reason = True, f"forced on by SpeedConfig; auto would leave it off: {reason}"
        decisions.append(SpeedDecision(name, bool(on), reason))
    return SpeedPlan(tuple(decisions), compile_mode=config.compile_mode)


def _compile(triton: bool, c_compiler: bool, where: str) -> tuple[bool, str]:
    if not triton:
        return False, f"{where}: a CUDA (sm_70+) default; on a CPU the C++ compile time rarely pays off"
    if not c_compiler:
        return False, f"{where}: no C compiler on the PATH (torch.compile needs one: install gcc or set CC)"
    return True, f"{where}: torch.compile fuses pointwise ops (the first steps pay the compile)"


def _conv_only(conv_net: bool, supported: bool, where: str, why: str) -> tuple[bool, str]:
    if not conv_net:
        return False, "the model has no 2-D convolutions"
    if not supported:
        return False, f"{where}: not a default here"
    return True, f"{where}, conv net: {why}"


def is_conv_net(model: nn.Module) -> bool:
    """The model has at least one 2-D convolution."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def prepare_model(model: nn.Module, plan: SpeedPlan) -> nn.Module:
    """Apply the model-side switches in place (channels-last weights, ``torch.compile``); returns ``model``.

    Compilation is in place (``nn.Module.compile``): parameter names, ``state_dict`` keys and checkpoints
    stay those of the eager model. Calling this twice does not compile twice.
    """
    if plan.enabled("channels_last"):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if plan.enabled("compile") and getattr(model, "_compiled_call_impl", None) is None:
        model.compile(mode=plan.compile_mode)
    return model


def channels_last_batch(batch: Any) -> Any:
    """4-D floating tensors in a (nested) batch -> channels-last; everything else unchanged."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 4 and batch.is_floating_point():
            return batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, list | tuple):
        items = [channels_last_batch(b) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, dict):
        return {k: channels_last_batch(v) for k, v in batch.items()}
    return batch


@contextlib.contextmanager
def backend_flags(plan: SpeedPlan) -> Iterator[None]:
    """TF32, cuDNN autotuning and compile's fall-back to eager as the plan says, for the block; restored after.

    Process-wide settings are restored so that one Trainer's choices never leak into code that runs
    after it (a plain fp32 baseline in the same process, another Trainer with the switch off).
    """
    import torch._dynamo.config as dynamo_config

    cudnn = torch.backends.cudnn
    before = (torch.get_float32_matmul_precision(), cudnn.allow_tf32, cudnn.benchmark, dynamo_config.suppress_errors)
    tf32 = plan.enabled("tf32")
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    cudnn.allow_tf32, cudnn.benchmark = tf32, plan.enabled("cudnn_benchmark")
    # A default-on compile must not end a run: a graph that fails to compile runs eagerly, with a logged warning.
    dynamo_config.suppress_errors = before[3] or plan.enabled("compile")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        cudnn.allow_tf32, cudnn.benchmark, dynamo_config.suppress_errors = before[1:]


def _batch_items(batch: Any) -> int:
    """Default item count of a batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, list | tuple) and batch:
        return _batch_items(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_items(next(iter(batch.values())))
    raise TypeError(f"cannot count items in a batch of type {type(batch).__name__}; pass items_fn")


@dataclass
class ThroughputWindow:
    """One timed window of training steps."""

    steps: int
    items: int
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")


class ThroughputMeter(Callback):
    """Times training steps after ``warmup_steps`` in windows of ``window_steps``; logs items/s per window.

    The device is synchronised only at the edges of a window, so queued GPU work is counted in the
    window it belongs to and the steps in between run as fast as without the meter. Windows are kept
    in ``windows``; ``items_per_s`` is the overall rate of every timed step.

    Args:
        warmup_steps: steps not timed (compilation, cuDNN autotuning, allocator warm-up).
        window_steps: steps per window; None: one window until the end of the fit.
        items_fn: items in a batch (default: leading dimension of its first tensor; e.g. tokens:
            ``lambda b: b[0].numel()``).
        clock: seconds since some origin; ``time.process_time`` counts this process's CPU time, which
            other load on a shared CPU machine inflates far less than wall time.
    """

    def __init__(
        self,
        *,
        warmup_steps: int = 5,
        window_steps: int | None = 50,
        items_fn: Callable[[Any], int] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if warmup_steps < 0 or (window_steps is not None and window_steps < 1):
            raise ValueError(
                f"need warmup_steps >= 0 and window_steps >= 1 or None; got {warmup_steps}, {window_steps}"
            )
        self.warmup_steps = warmup_steps
        self.window_steps = window_steps
        self.items_fn = items_fn or _batch_items
        self.clock = clock
        self.windows: list[ThroughputWindow] = []
        self._seen = 0
        self._open: tuple[float, int, int] | None = None  # (start time, steps, items)

    @property
    def items_per_s(self) -> float:
        """Items per second over all closed windows (nan before the first one closes)."""
        secs = sum(w.seconds for w in self.windows)
        return sum(w.items for w in self.windows) / secs if secs > 0 else float("nan")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any) -> None:
        if self._open is None and self._seen >= self.warmup_steps:
            _sync(pl_module)
            self._open = (self.clock(), 0, 0)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        self._seen += 1
        if self._open is None:
            return
        start, steps, items = self._open
        self._open = (start, steps + 1, items + self.items_fn(batch))
        if self.window_steps is not None and steps + 1 >= self.window_steps:
            self._close(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._open is not None and self._open[1] > 0:
            self._close(pl_module)
        self._open = None

    def _close(self, pl_module: pl.LightningModule) -> None:
        assert self._open is not None
        _sync(pl_module)
        start, steps, items = self._open
        window = ThroughputWindow(steps, items, self.clock() - start)
        self.windows.append(window)
        self._open = None
        log.info(
            "throughput: %.1f items/s (%.2f ms/step over %d steps)", window.items_per_s, 1e3 * window.step_s, steps
        )


def _sync(pl_module: pl.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
