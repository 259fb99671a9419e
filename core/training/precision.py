"""Precision resolution: one pure function from (requested, device) to a decision with its reason.

``precision="auto"`` picks what an expert would pick by hand: bf16-mixed on CUDA GPUs with bf16
(Ampere, sm_80, and newer), fp16-mixed with dynamic loss scaling on older GPUs, fp32 on CPU unless
bf16 was measured faster there. Explicit requests the device cannot honour are downgraded, and the
reason says so (after Lightning's ``accelerator_connector.py``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass

import torch
from torch import nn

from core.config import keel_home
from core.utils.registry import Registry

__all__ = [
    "CPU_BF16_MIN_PARAMS",
    "DeviceInfo",
    "Precision",
    "PRECISIONS",
    "cpu_bf16_candidate",
    "cpu_bf16_speedup",
    "detect_device",
    "resolve_precision",
]

log = logging.getLogger(__name__)

# bf16 autocast must beat fp32 by this factor on the micro-benchmark to be chosen on CPU: a tie is not worth
# bf16's rounding, and the margin absorbs timing noise on a shared machine.
CPU_BF16_MIN_SPEEDUP = 1.2
# Below this many parameters a model's matmuls are too small for bf16 to outweigh autocast's casts on a CPU
# (measured here: a 0.5M-parameter MLP gains ~1.1x, a 4.7M one ~3.5x), so bf16 is not even measured.
CPU_BF16_MIN_PARAMS = 1_000_000

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
    """What precision and speed resolution need to know about the training device.

    Attributes:
        type: ``"cpu"``, ``"cuda"`` or ``"mps"``.
        name: human-readable device name.
        capability: CUDA compute capability ``(major, minor)``; None off CUDA.
        bf16_supported: the device computes in bf16 natively.
        cpu_bf16_faster: bf16 autocast was measured faster than fp32 on this CPU.
        c_compiler: a C compiler is on the PATH (``torch.compile`` builds its kernels' launchers with one).
    """

    type: str = "cpu"
    name: str = "cpu"
    capability: tuple[int, int] | None = None
    bf16_supported: bool = False
    cpu_bf16_faster: bool = False
    c_compiler: bool = True


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


def detect_device(accelerator: str = "auto", *, measure_cpu_bf16: bool = False) -> DeviceInfo:
    """Describe the device Lightning will train on for ``accelerator`` ("auto", "cpu", "cuda"/"gpu").

    With ``measure_cpu_bf16`` a CPU's ``cpu_bf16_faster`` comes from :func:`cpu_bf16_speedup` (measured
    once per machine and cached); without it, it is False.
    """
    if accelerator not in ("auto", "cpu", "cuda", "gpu"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'cuda' or 'gpu', got {accelerator!r}")
    if accelerator != "cpu" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(0)
        name = torch.cuda.get_device_name(0)
        return DeviceInfo(type="cuda", name=name, capability=cap, bf16_supported=cap >= (8, 0), c_compiler=_has_cc())
    if accelerator in ("cuda", "gpu"):
        raise RuntimeError(f"accelerator={accelerator!r} was requested but torch sees no CUDA device")
    faster = measure_cpu_bf16 and cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP
    return DeviceInfo(type="cpu", name="cpu", bf16_supported=True, cpu_bf16_faster=faster, c_compiler=_has_cc())


def _has_cc() -> bool:
    return any(shutil.which(cc) for cc in (os.environ.get("CC") or "", "gcc", "clang", "cc") if cc)


def cpu_bf16_candidate(requested: str, model: nn.Module) -> bool:
    """Whether bf16 is worth measuring on a CPU: ``"auto"`` was requested and the model is big enough."""
    auto = str(requested).strip().lower() == "auto"
    return auto and sum(p.numel() for p in model.parameters()) >= CPU_BF16_MIN_PARAMS


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of a training step of a transformer MLP block on this CPU.

    Measured on one thread (CPU time, so other load on the machine barely moves it), once per
    (CPU model, torch version), and cached in ``keel_home()/cache``; the
    environment variable ``KEEL_CPU_BF16_SPEEDUP`` (a number) overrides the measurement, for
    reproducible runs. The block (512 -> 2048 -> 512, 256 rows) is small enough to time in well under
    a second and large enough that the matmuls, not the autocast casts, dominate, as in a real model.
    """
    forced = os.environ.get("KEEL_CPU_BF16_SPEEDUP")
    if forced:
        try:
            return float(forced)
        except ValueError:
            raise ValueError(f"KEEL_CPU_BF16_SPEEDUP must be a number, got {forced!r}") from None
    key = f"{_cpu_name()}|torch {torch.__version__}"
    path = keel_home() / "cache" / "cpu_bf16.json"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}  # unreadable: measure again and rewrite it
    if key not in cache:
        cache[key] = _time_bf16_speedup()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
        log.info("measured bf16 autocast on this CPU: %.2fx fp32 (%s)", cache[key], key)
    return float(cache[key])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_bf16_speedup(repeats: int = 7) -> float:
    with torch.random.fork_rng(devices=[]):  # building the block must not move the caller's RNG
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
        x = torch.randn(256, 512)

    def step(bf16: bool) -> float:
        start = time.process_time()  # CPU time of this process: what other processes' load inflates least
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = block(x)
        out.float().square().mean().backward()
        return time.process_time() - start

    best = {False: float("inf"), True: float("inf")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread's CPU time: the kernels' speed, not how busy the other cores are
    try:
        for _ in range(repeats):  # interleaved, best of each: robust to bursts of other load
            for bf16 in (False, True):
                best[bf16] = min(best[bf16], step(bf16))
    finally:
        torch.set_num_threads(threads)
    return best[False] / best[True]


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
        # fp16 autocast runs on CPU, but without fast fp16 math: a 1024x1024 matmul took 1.9 s against 10 ms in fp32
        # (2.5 ms in bf16) on the development machine's AVX512-bf16 cores (torch 2.14).
        why = f"CPUs have no fast fp16 math; downgraded {requested!r} to 32-true (use bf16-mixed on a CPU)"
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
