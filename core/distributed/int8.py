"""Keel's int8 gradient compression: chunk-wise scaled int8, error feedback, reduce-scatter + all-gather.

Each DDP bucket (flattened gradients, ``n`` elements) is exchanged in two hops so that the volume
scales like a ring all-reduce, not like an all-gather of every rank's gradient:

1. Worker side. Add the residual this rank was left with last step (error feedback), cut the
   bucket into ``W`` owner segments of whole chunks, quantise each chunk of ``chunk`` elements to
   int8 with one fp32 scale (``max|x| / 127``, round to nearest) and keep ``x - dequant(q)`` as the
   new residual.
2. Reduce-scatter, done as an all-to-all: gloo (and NCCL) cannot sum int8 without overflow, so
   rank ``r`` receives every rank's int8 copy of segment ``r`` with its scales, dequantises them
   and sums in fp32 (the mean over ranks).
3. Owner side. Add the owner's own residual from last step, re-quantise the mean segment, keep the
   new owner residual (the two-sided error feedback of 1-bit Adam, Tang et al. 2021).
4. All-gather of the int8 mean segments and scales; every rank dequantises the same bytes, so all
   replicas apply bit-identical gradients.

Int8 payload and fp32 scales travel in one byte buffer per hop. Bytes per rank per bucket:
``2 (W-1)/W n (1 + 4/chunk)`` against ``2 (W-1)/W 4n`` for fp32: 3.94x fewer at ``chunk=256``.
The hook returns a Future chained on the two asynchronous collectives, so DDP overlaps it with
the rest of the backward pass. Non-finite gradients stay non-finite (a scale of inf/nan is sent
as such) so a loss scaler still sees the overflow, and they never enter a residual.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from core.distributed.wire import CommState, allgather_bytes, alltoall_bytes

__all__ = ["Int8State", "int8_hook", "quantize", "dequantize", "pack", "unpack", "encode", "owner_reduce", "decode"]

QMAX = 127
DEFAULT_CHUNK = 256


def quantize(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-wise symmetric int8: ``x`` (k*chunk,) fp32 -> (q int8 (k*chunk,), scales fp32 (k,))."""
    blocks = x.view(-1, chunk)  # (k, chunk)
    scale = blocks.abs().amax(dim=1) / QMAX  # (k,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero chunk quantises to zeros
    q = torch.round(blocks / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.view(-1), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, chunk: int) -> torch.Tensor:
    """Inverse of :func:`quantize`; a non-finite scale makes its whole chunk non-finite."""
    return (q.view(-1, chunk).float() * scale[:, None]).view(-1)


def pack(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows of int8 values and their fp32 scales as one uint8 buffer: (R, m) + (R, k) -> (R, m + 4k)."""
    return torch.cat([q.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=-1)


def unpack(buf: torch.Tensor, seg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack` for rows of ``seg`` int8 values."""
    return buf[..., :seg].contiguous().view(torch.int8), buf[..., seg:].contiguous().view(torch.float32)


def _residual(x: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    # A non-finite step is skipped by the loss scaler; its error must not poison later steps.
    return torch.nan_to_num(x - deq, nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class Int8State(CommState):
    """:class:`CommState` plus the chunk size and the two error-feedback residuals per bucket.

    Residuals are keyed by bucket index and checked against the bucket's parameters, because DDP
    rebuilds its buckets after the first step: a residual is only reused for the same tensors.
    """

    chunk: int = DEFAULT_CHUNK
    error_feedback: bool = True
    worker_residual: dict[int, tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=dict)
    owner_residual: dict[int, tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 element, got {self.chunk}")

    def take(self, store: dict, index: int, key: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The residual stored for (bucket ``index``, parameters ``key``), or zeros shaped like ``like``."""
        held = store.get(index)
        if held is None or held[0] != key or held[1].shape != like.shape:
            return torch.zeros_like(like)
        return held[1]


def segment_size(n: int, world: int, chunk: int) -> int:
    """Elements per owner segment: ``n`` split over ``world`` owners in whole chunks."""
    return -(-n // (world * chunk)) * chunk


def encode(state: Int8State, grad: torch.Tensor, *, world: int, key: tuple[int, ...], index: int) -> torch.Tensor:
    """Worker side: gradient + residual -> int8 + scales, one row of bytes per owner: (W, seg + 4 seg/chunk)."""
    n, chunk = grad.numel(), state.chunk
    seg = segment_size(n, world, chunk)
    x = torch.zeros(world * seg, dtype=torch.float32, device=grad.device)
    x[:n] = grad.detach().reshape(-1).float()
    if state.error_feedback:
        x += state.take(state.worker_residual, index, key, x)
    q, scale = quantize(x, chunk)
    if state.error_feedback:
        state.worker_residual[index] = (key, _residual(x, dequantize(q, scale, chunk)))
    return pack(q.view(world, seg), scale.view(world, seg // chunk))


def owner_reduce(
    state: Int8State, recv: torch.Tensor, *, world: int, seg: int, key: tuple[int, ...], index: int
) -> torch.Tensor:
    """Owner side: every rank's int8 copy of this rank's segment -> fp32 mean (+ residual) -> int8 row."""
    chunk = state.chunk
    parts_q, parts_scale = unpack(recv, seg)
    mean = dequantize(parts_q.reshape(-1), parts_scale.reshape(-1), chunk).view(world, seg).sum(0) / world
    if state.error_feedback:
        mean += state.take(state.owner_residual, index, key, mean)
    q, scale = quantize(mean, chunk)
    if state.error_feedback:
        state.owner_residual[index] = (key, _residual(mean, dequantize(q, scale, chunk)))
    return pack(q, scale)


def decode(gathered: torch.Tensor, *, world: int, seg: int, chunk: int, n: int) -> torch.Tensor:
    """Every rank: the gathered int8 mean segments -> the first ``n`` fp32 values."""
    all_q, all_scale = unpack(gathered.view(world, -1), seg)
    return dequantize(all_q.reshape(-1), all_scale.reshape(-1), chunk)[:n]


def int8_hook(state: Int8State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean of every rank's bucket through int8 (see the module docstring)."""
    group = state.process_group
    world, chunk = dist.get_world_size(group), state.chunk
    grad = bucket.buffer()
    n = grad.numel()
    seg = segment_size(n, world, chunk)
    index, key = bucket.index(), tuple(id(p) for p in bucket.parameters())

    send = encode(state, grad, world=world, key=key, index=index)
    recv = torch.empty_like(send)
    row = send.shape[1]
    state.count(alltoall_bytes(send.numel(), world) + allgather_bytes(row, world), n)
    gathered = torch.empty(world * row, dtype=torch.uint8, device=grad.device)

    def reduce_and_gather(fut: torch.futures.Future) -> torch.Tensor:
        fut.wait()
        mine = owner_reduce(state, recv, world=world, seg=seg, key=key, index=index)
        work = dist.all_gather_single(gathered, mine, group=group, async_op=True)
        assert work is not None
        work.wait()
        return gathered

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        fut.wait()
        grad.copy_(decode(gathered, world=world, seg=seg, chunk=chunk, n=n))
        return grad

    work = dist.all_to_all_single(recv.view(-1), send.view(-1), group=group, async_op=True)
    assert work is not None
    return work.get_future().then(reduce_and_gather).then(finish)
