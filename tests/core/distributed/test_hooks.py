"""The compression hooks inside real DDP on 2 and 4 CPU processes: mean vs exact, error feedback, bytes."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from core.distributed import COMPRESSIONS, build_comm_hook
from core.distributed.int8 import dequantize, pack, quantize, unpack
from core.distributed.wire import allgather_bytes, allreduce_bytes, alltoall_bytes
from core.utils.registry import UnknownNameError
from tests.core.distributed.helpers import run_on_processes

FEEDBACK_STEPS = 40
SIZES = (20000, 517)  # two parameters; the odd size exercises padding to whole chunks


class Probe(nn.Module):
    """``loss = sum_i <w_i, g_i>``: the local gradient of ``w_i`` is exactly the chosen ``g_i``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in SIZES)

    def forward(self, gs: list[torch.Tensor]) -> torch.Tensor:
        return sum((w * g).sum() for w, g in zip(self.w, gs, strict=True))  # type: ignore[return-value]


def local_grads(rank: int, step: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return [torch.randn(n, generator=g) * (1 + rank) for n in SIZES]


def exchange(ddp: nn.parallel.DistributedDataParallel, gs: list[torch.Tensor]) -> list[torch.Tensor]:
    ddp.zero_grad(set_to_none=True)
    ddp(gs).backward()
    return [p.grad.detach().clone() for p in ddp.module.parameters()]


def ddp_with(name: str, **options: Any) -> tuple[nn.parallel.DistributedDataParallel, Any]:
    hook = build_comm_hook(name, **options)
    ddp = nn.parallel.DistributedDataParallel(Probe(), bucket_cap_mb=0.005)  # ~1300 floats: several buckets
    hook.register(ddp)
    return ddp, hook


def mean_vs_exact(rank: int, world: int) -> dict[str, Any]:
    exact = [torch.stack(t).mean(0) for t in zip(*(local_grads(r) for r in range(world)), strict=True)]
    peak = max(float(g.abs().max()) for r in range(world) for g in local_grads(r))
    out: dict[str, Any] = {"peak": peak}
    for name in ("none", "fp16", "bf16", "int8"):
        ddp, hook = ddp_with(name)
        got = exchange(ddp, local_grads(rank))
        err = torch.cat([a - b for a, b in zip(got, exact, strict=True)])
        everyone = [torch.empty_like(err) for _ in range(world)]
        dist.all_gather(everyone, torch.cat(got))
        out[name] = {
            "max_abs": float(err.abs().max()),
            "rel_l2": float(err.norm() / torch.cat(exact).norm()),
            "same_on_all_ranks": all(torch.equal(everyone[0], e) for e in everyone),
            "bytes": hook.state.bytes_sent,
            "ratio": hook.state.ratio,
            "buckets": hook.state.buckets,
        }
    return out


def feedback(rank: int, world: int, steps: int) -> dict[str, list[float]]:
    """Same gradients every step: how far the running sum of applied gradients drifts from steps * mean."""
    exact = torch.cat([torch.stack(t).mean(0) for t in zip(*(local_grads(r) for r in range(world)), strict=True)])
    out = {}
    for ef in (True, False):
        ddp, _ = ddp_with("int8", error_feedback=ef)
        total, drift = torch.zeros_like(exact), []
        for t in range(1, steps + 1):
            total += torch.cat(exchange(ddp, local_grads(rank)))
            drift.append(float((total / t - exact).norm() / exact.norm()))
        out[str(ef)] = drift
    return out


def everything(rank: int, world: int, steps: int) -> dict[str, Any]:
    """All multi-process checks in one process group: starting processes is the slow part."""
    out: dict[str, Any] = {"mean": mean_vs_exact(rank, world)}
    if steps:
        out["feedback"] = feedback(rank, world, steps)
        out["powersgd"] = powersgd_bytes(rank, world)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return run_on_processes(everything, 2, FEEDBACK_STEPS)


def powersgd_bytes(rank: int, world: int) -> dict[str, int]:
    """Bytes torch's PowerSGD really hands to all_reduce vs what Keel's counter says."""
    real = 0
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        nonlocal real
        real += allreduce_bytes(tensor.numel() * tensor.element_size(), world)
        return original(tensor, *args, **kwargs)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    hook = build_comm_hook("powersgd", rank=2, start_iter=2)
    hook.register(ddp)
    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        for step in range(5):
            ddp.zero_grad()
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank * 10 + step))
            ddp(x).square().mean().backward()
    finally:
        dist.all_reduce = original  # type: ignore[assignment]
    return {"real": real, "counted": hook.state.bytes_sent}


def test_quantize_round_trip_is_within_half_a_step() -> None:
    x = torch.randn(10 * 256) * torch.logspace(-3, 2, 10).repeat_interleave(256)
    q, scale = quantize(x, 256)
    assert q.dtype == torch.int8 and scale.shape == (10,)
    step = scale.repeat_interleave(256)
    assert torch.all((dequantize(q, scale, 256) - x).abs() <= step / 2 + 1e-7 * x.abs())
    q2, s2 = unpack(pack(q.view(2, -1), scale.view(2, -1)), 5 * 256)
    assert torch.equal(q2.reshape(-1), q) and torch.equal(s2.reshape(-1), scale)


def test_quantize_keeps_zeros_and_non_finite() -> None:
    x = torch.zeros(512)
    x[300] = float("inf")
    q, scale = quantize(x, 256)
    back = dequantize(q, scale, 256)
    assert torch.equal(back[:256], torch.zeros(256))  # an all-zero chunk stays exactly zero
    assert not torch.isfinite(back[256:]).any()  # an overflow stays visible to the loss scaler


def test_wire_formulas() -> None:
    assert allreduce_bytes(4000, 4) == 6000 and alltoall_bytes(4000, 4) == 3000 and allgather_bytes(1000, 4) == 3000
    assert allreduce_bytes(4000, 1) == 0


def test_unknown_compression_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="int8.*powersgd"):
        build_comm_hook("int4")
    assert COMPRESSIONS.names() == ["bf16", "fp16", "int8", "none", "powersgd"]


def check_means(results: list[dict[str, Any]], world: int) -> None:
    for r in results:
        peak = r["peak"]
        assert r["none"]["max_abs"] < 1e-5 * peak
        assert r["bf16"]["rel_l2"] < 1e-2 and r["fp16"]["rel_l2"] < 1e-3
        # Two roundings (worker, then owner), each at most half an int8 step of max|x|/127.
        assert r["int8"]["max_abs"] <= 2 * peak / 254 * 1.001
        # Gaussian chunks: max|x| ~ 3 sigma, so each rounding adds ~3/127/sqrt(12) = 0.7% noise; two of them ~1%.
        assert r["int8"]["rel_l2"] < 0.015
        for name in ("none", "fp16", "bf16", "int8"):
            assert r[name]["same_on_all_ranks"], name
            assert r[name]["buckets"] >= 1, name
    n = sum(SIZES)
    none, int8 = results[0]["none"], results[0]["int8"]
    assert none["bytes"] == pytest.approx(allreduce_bytes(4 * n, world), abs=4 * none["buckets"])
    assert none["ratio"] == 1.0
    assert int8["ratio"] >= 3.5
    # Reduce-scatter + all-gather volume: about 2 (W-1)/W bytes per element, not (W-1) as an all-gather would be.
    assert int8["bytes"] < 2.3 * (world - 1) / world * n


@pytest.mark.distributed
def test_hook_mean_against_exact_mean_2_ranks(two_ranks: list[dict[str, Any]]) -> None:
    check_means([r["mean"] for r in two_ranks], 2)


@pytest.mark.distributed
@pytest.mark.slow
def test_hook_mean_against_exact_mean_4_ranks() -> None:
    check_means([r["mean"] for r in run_on_processes(everything, 4, 0)], 4)


@pytest.mark.distributed
def test_error_feedback_makes_accumulated_error_vanish(two_ranks: list[dict[str, Any]]) -> None:
    drift = two_ranks[0]["feedback"]
    with_ef, without = drift["True"], drift["False"]
    assert with_ef[0] == pytest.approx(without[0])  # the first step is the same rounding
    assert with_ef[-1] < with_ef[0] / 10  # with feedback the average error shrinks like 1/steps
    assert without[-1] > without[0] / 2  # without it the same rounding error repeats every step
    assert math.isfinite(with_ef[-1])


@pytest.mark.distributed
def test_powersgd_bytes_match_what_torch_sends(two_ranks: list[dict[str, Any]]) -> None:
    for r in (x["powersgd"] for x in two_ranks):
        assert r["counted"] == r["real"] and r["real"] > 0
