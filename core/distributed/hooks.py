"""Gradient-compression DDP communication hooks, chosen by name: ``Trainer(compression=...)``.

=========== ============================================================ =================
name        what goes on the wire                                         bytes vs fp32
=========== ============================================================ =================
``none``    fp32 all-reduce (DDP's default, plus byte counting)           1x
``fp16``    fp16 all-reduce of the bucket pre-divided by W                2x fewer
``bf16``    bf16 all-reduce (fp32's exponent range: no overflow)          2x fewer
``int8``    Keel's chunk-scaled int8 with error feedback (:mod:`.int8`)   ~3.9x fewer
``powersgd`` rank-r PowerSGD (Vogels et al. 2019), torch's implementation model dependent
=========== ============================================================ =================

Every hook counts the bytes it sends in its :class:`~core.distributed.wire.CommState`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from core.distributed.int8 import Int8State, int8_hook
from core.distributed.wire import CommState, allreduce_bytes
from core.utils.registry import Registry

__all__ = ["COMPRESSIONS", "CommHook", "build_comm_hook", "PowerSGDCommState"]

HookFn = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


@dataclass(frozen=True)
class CommHook:
    """A hook and its state, ready for ``DistributedDataParallel.register_comm_hook(state, hook)``."""

    name: str
    state: CommState
    hook: HookFn

    def register(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        ddp.register_comm_hook(self.state, self.hook)


COMPRESSIONS: Registry[Callable[..., CommHook]] = Registry("gradient compression")


def build_comm_hook(name: str, *, process_group: dist.ProcessGroup | None = None, **options: Any) -> CommHook:
    """The hook registered as ``name`` (unknown names raise and list the known ones)."""
    return COMPRESSIONS.get(name)(process_group=process_group, **options)


def _cast_allreduce_hook(dtype: torch.dtype) -> HookFn:
    """All-reduce the bucket in ``dtype`` (divided by W first, so fp16 sums cannot overflow)."""

    def hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        grad = bucket.buffer()
        world = state.world()
        wire = (grad / world).to(dtype)
        state.count(allreduce_bytes(wire.numel() * wire.element_size(), world), grad.numel())
        work = dist.all_reduce(wire, group=state.process_group, async_op=True)
        assert work is not None

        def back(fut: torch.futures.Future) -> torch.Tensor:
            fut.wait()
            grad.copy_(wire)
            return grad

        return work.get_future().then(back)

    return hook


@COMPRESSIONS.register("none")
def _none(*, process_group: dist.ProcessGroup | None = None) -> CommHook:
    return CommHook("none", CommState(process_group), _cast_allreduce_hook(torch.float32))


@COMPRESSIONS.register("fp16")
def _fp16(*, process_group: dist.ProcessGroup | None = None) -> CommHook:
    return CommHook("fp16", CommState(process_group), _cast_allreduce_hook(torch.float16))


@COMPRESSIONS.register("bf16")
def _bf16(*, process_group: dist.ProcessGroup | None = None) -> CommHook:
    return CommHook("bf16", CommState(process_group), _cast_allreduce_hook(torch.bfloat16))


@COMPRESSIONS.register("int8")
def _int8(*, process_group: dist.ProcessGroup | None = None, chunk: int = 256, error_feedback: bool = True) -> CommHook:
    return CommHook("int8", Int8State(process_group, chunk=chunk, error_feedback=error_feedback), int8_hook)


class PowerSGDCommState(CommState):
    """Torch's ``PowerSGDState`` plus byte counting (its traffic is re-derived per bucket, see ``_powersgd_bytes``)."""

    def __init__(self, process_group: dist.ProcessGroup | None, *, rank: int, start_iter: int) -> None:
        super().__init__(process_group)
        self.inner = torch_powersgd.PowerSGDState(
            process_group, matrix_approximation_rank=rank, start_powerSGD_iter=start_iter, min_compression_rate=2
        )


def _powersgd_bytes(state: PowerSGDCommState, bucket: dist.GradBucket) -> int:
    """Bytes torch's ``powerSGD_hook`` sends for ``bucket``, mirroring its decisions (checked in the tests).

    Before ``start_powerSGD_iter`` a plain all-reduce; after, one all-reduce of the uncompressed
    tensors (vectors, and matrices too small to be worth it) and two of the P and Q factors.
    """
    inner, world = state.inner, state.world()
    size = bucket.buffer().element_size()
    if inner.iter < inner.start_powerSGD_iter:
        return allreduce_bytes(bucket.buffer().numel() * size, world)
    rank, sent = inner.matrix_approximation_rank, 0
    plain = 0
    factors_p = factors_q = 0
    for g in bucket.gradients():
        n, m = g.shape[0], g.numel() // max(1, g.shape[0])
        r = min(n, m, rank)
        if (n + m) * r * inner.min_compression_rate < n * m:
            factors_p, factors_q = factors_p + n * r, factors_q + m * r
        else:
            plain += g.numel()
    for numel in (plain, factors_p, factors_q):
        sent += allreduce_bytes(numel * size, world)
    return sent


def _powersgd_hook(state: PowerSGDCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    state.count(_powersgd_bytes(state, bucket), bucket.buffer().numel())
    return torch_powersgd.powerSGD_hook(state.inner, bucket)


@COMPRESSIONS.register("powersgd")
def _powersgd(*, process_group: dist.ProcessGroup | None = None, rank: int = 2, start_iter: int = 10) -> CommHook:
    return CommHook("powersgd", PowerSGDCommState(process_group, rank=rank, start_iter=start_iter), _powersgd_hook)
