"""Keel's loss scaling under FSDP on 2 CPU processes (gloo).

An inf gradient injected on ONE rank, into a parameter whose gradient shard lives on the OTHER rank, makes
both ranks skip that step (the sharded scaler all-reduces the inf flag): weights, optimizer state and LR
schedule stay where they were on both, the scale backs off, and the run goes on as the run that never saw
that batch. Precisely: its final weight shards equal, bit for bit, those of a run on the same data without
that global batch (the schedule is in warm-up for the whole run, so every LR depends on the count of applied
steps, and a skipped step that advanced it would show). That holds where the loss scale changes no bit of the
gradients: fp32 and bf16 (it multiplies by powers of two), and fp16 with a static scale. fp16 with the dynamic
scale is checked for the same skips, schedule and scale, not for bit equality (see ``EXACT``).

fp16 runs here although ``Trainer(precision="16-mixed")`` trains fp32 on a CPU (``resolve_precision`` refuses
fp16 there): the test sets the resolved precision itself. torch's FSDP computes and reduce-scatters in fp16
over gloo on CPU, so the fp16 path (fp16 gradients, overflow, skip, back-off) runs as on a GPU, with CPU
kernels; the ``cuda``-marked test runs it on a GPU.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.utils.data import DataLoader, TensorDataset

from core.training import Precision, Trainer
from core.training.scaling import KeelFSDPPrecision, build_precision_plugin
from tests.core.distributed.helpers import run_on_processes
from tests.core.training.helpers import Kill

WORLD, PER_RANK = 2, 4
GLOBAL = WORLD * PER_RANK
BATCHES = 8  # global batches in the poisoned run; the reference run has one fewer
BAD = 3  # the poisoned global batch (1-based)
POISON_RANK = 0  # injects the inf; the poisoned parameter's gradient shard is on the other rank
WARMUP = 50  # longer than the run: every step's LR is (applied steps + 1) / WARMUP * LR
CKPT_EVERY, KILL_AT = 4, 6  # checkpoint after the skip, killed two steps later


class PoisonGrad(torch.autograd.Function):
    """Identity forward; when armed, multiplies the incoming gradient by inf in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, armed: bool) -> torch.Tensor:
        ctx.armed = armed
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad * float("inf") if ctx.armed else grad), None


class Head(nn.Linear):
    """The output layer; its bias gradient becomes inf while ``armed``."""

    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, PoisonGrad.apply(self.bias, Head.armed))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


def make_net() -> nn.Module:
    # FSDP units: each Block, and the Sequential holding the first layer and the Head. The Head's bias is the
    # last element of that unit's flat parameter, so its gradient shard is the last rank's.
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 16), Block(16), Block(16), Head(16, 1))


def make_rows(n: int) -> TensorDataset:
    """(x, y, row number): the row number tells the loss which global batch it is on, also after a resume."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, torch.tanh(x @ torch.randn(6, 1, generator=g)), torch.arange(n))


def loader(skip_bad: bool) -> DataLoader:
    """The rows in order, global batch after global batch (each rank takes its interleaved share)."""
    rows = make_rows(BATCHES * GLOBAL)
    keep = [i for i in range(len(rows)) if not (skip_bad and (BAD - 1) * GLOBAL <= i < BAD * GLOBAL)]
    return DataLoader(TensorDataset(*(t[keep] for t in rows.tensors)), batch_size=PER_RANK, shuffle=False)


class Recorder(pl.Callback):
    """Per training batch: whether this rank's gradient shard had an inf, the schedule's count, the loss scale."""

    def __init__(self) -> None:
        self.local_inf: list[bool] = []
        self.skipped: list[bool] = []
        self.sched: list[int] = []
        self.scale: list[float | None] = []
        self.plugin = self.scaler = ""

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.plugin = type(trainer.precision_plugin).__name__
        self.scaler = type(getattr(trainer.precision_plugin, "keel_scaler", None)).__name__

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.local_inf.append(not all(bool(torch.isfinite(g).all()) for g in grads))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.sched.append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)
        self.skipped.append(bool(getattr(trainer.precision_plugin, "last_step_skipped", False)))
        self.scale.append(getattr(trainer.precision_plugin, "loss_scale", None))


def fit(
    precision: str,
    loss_scaling: Any,
    *,
    skip_bad: bool,
    root: Path,
    resume: bool = False,
    kill: bool = False,
    accelerator: str = "cpu",
    devices: int = WORLD,
) -> tuple[Trainer, Any, Recorder]:
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, rows = batch
        Head.armed = int(rows[0]) // GLOBAL == BAD - 1 and dist.get_rank() == POISON_RANK
        return F.mse_loss(model(x).float(), y)

    recorder = Recorder()
    trainer = Trainer(
        make_net(),
        loss_fn=loss_fn,
        precision=precision,
        loss_scaling=loss_scaling,
        lr=1e-2,
        warmup_steps=WARMUP,
        max_epochs=1,
        devices=devices,
        strategy="fsdp",
        accelerator=accelerator,
        checkpoint_dir=root,
        checkpoint_every_n_steps=CKPT_EVERY,
        resume=resume,
        progress=False,
        log_every_n_steps=1,
        callbacks=[recorder, Kill(KILL_AT)] if kill else [recorder],
    )
    if precision == "16-mixed" and accelerator == "cpu":  # Keel trains fp32 when asked for fp16 on a CPU
        trainer.precision = Precision("16-mixed", "16-mixed", "forced by the test: fp16 arithmetic on CPU")
    result = trainer.train(loader(skip_bad))
    return trainer, result, recorder


def shards(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.module.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((float((x - y).abs().max()) if x.numel() else 0.0) for x, y in zip(a, b, strict=True))


def logged(root: Path) -> dict[str, list[float]]:
    """The per-step values in the run's CSV log, by column."""
    rows = list(csv.DictReader(next((root / "logs").rglob("metrics.csv")).read_text().splitlines()))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in ("loss_scale", "skipped_steps")}


def scaling_run(rank: int, world: int, settings: list[tuple[str, Any]], tmp: str) -> dict[str, Any]:
    """Every setting: the poisoned run, the reference run, the poisoned run killed and resumed; one unscaled run."""
    # Lightning reads the launch from torchrun's variables; the process group already exists (run_on_processes).
    os.environ.update(
        TORCHELASTIC_RUN_ID="fsdp-scaling",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    out: dict[str, Any] = {}
    for precision, scaling in settings:
        root = Path(tmp) / f"{precision}_{scaling}"
        trainer, result, rec = fit(precision, scaling, skip_bad=False, root=root / "poisoned")
        reference, ref_result, _ = fit(precision, scaling, skip_bad=True, root=root / "reference")
        with pytest.raises(RuntimeError, match="simulated kill"):
            fit(precision, scaling, skip_bad=False, root=root / "killed", kill=True)
        resumed, res_result, _ = fit(precision, scaling, skip_bad=False, root=root / "killed", resume=True)
        out[f"{precision}/{scaling}"] = {
            "precision": result.precision.name,
            "plugin": rec.plugin,
            "scaler": rec.scaler,
            "local_inf": rec.local_inf,
            "skips": rec.skipped,
            "sched": rec.sched,
            "scale": rec.scale,
            "skipped": result.skipped_steps,
            "final_scale": result.loss_scale,
            "steps": result.global_step,
            "ref_skipped": ref_result.skipped_steps,
            "ref_steps": ref_result.global_step,
            "ref_diff": max_diff(shards(trainer), shards(reference)),
            "resumed_diff": max_diff(shards(trainer), shards(resumed)),
            "resumed_skipped": res_result.skipped_steps,
            "resumed_scale": res_result.loss_scale,
            "logged": logged(root / "poisoned") if rank == 0 else None,
        }
    _, unscaled, rec = fit("32-true", None, skip_bad=True, root=Path(tmp) / "unscaled")
    out["unscaled"] = {"skipped": unscaled.skipped_steps, "scale": unscaled.loss_scale, "scaler": rec.scaler}
    return out


# fp16 at the dynamic scaler's 2**16 overflows in the first step's fp16 reduce-scatter (a real skip), so that
# setting skips twice; the others skip only the poisoned step.
SETTINGS = [("32-true", "dynamic"), ("bf16-mixed", "dynamic"), ("16-mixed", 128.0), ("16-mixed", "dynamic")]
# Where the scale changes no bit of the gradients: fp32 and bf16 (powers of two, no subnormals in reach), or a
# static scale. In fp16 a halved dynamic scale moves small gradients into fp16's subnormal range, rounding them
# differently from the reference run (which kept the higher scale), so the two runs are close, not equal.
EXACT = [s for s in SETTINGS if s != ("16-mixed", "dynamic")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fsdp_scaling")
    return run_on_processes(scaling_run, WORLD, SETTINGS, str(tmp), timeout_s=300)


def expected_scales(scaling: Any, skips: list[bool]) -> list[float]:
    """The scale after each step: static, or 2**16 halved at every skip (growth needs 2000 clean steps)."""
    if scaling != "dynamic":
        return [scaling] * len(skips)
    return [2.0**16 / 2 ** sum(skips[: i + 1]) for i in range(len(skips))]


@pytest.mark.distributed
@pytest.mark.parametrize(("precision", "scaling"), SETTINGS)
def test_inf_on_one_rank_skips_the_step_on_both(precision: str, scaling: Any, runs: list[dict[str, Any]]) -> None:
    by_rank = [r[f"{precision}/{scaling}"] for r in runs]
    skips = by_rank[0]["skips"]
    assert skips[BAD - 1] and sum(skips) == (2 if (precision, scaling) == ("16-mixed", "dynamic") else 1)
    for run in by_rank:
        assert run["precision"] == precision
        assert (run["plugin"], run["scaler"]) == ("KeelFSDPPrecision", "_ShardedGradScaler")
        assert run["skips"] == skips  # the same steps skipped on every rank
        assert run["steps"] == BATCHES and run["skipped"] == sum(skips)
        # The schedule counts applied steps only: it stands still at every skipped step, on every rank.
        assert run["sched"] == [i + 1 - sum(skips[: i + 1]) for i in range(BATCHES)]
        assert run["scale"] == expected_scales(scaling, skips) and run["final_scale"] == run["scale"][-1]
    # A step is skipped on both ranks exactly when some rank's gradient shard held an inf. The injected one
    # reached only rank 1's shard (rank 0 injected it): rank 0 skipped on rank 1's word alone.
    assert skips == [any(run["local_inf"][i] for run in by_rank) for i in range(BATCHES)]
    assert [run["local_inf"][BAD - 1] for run in by_rank] == [False, True]


@pytest.mark.distributed
@pytest.mark.parametrize(("precision", "scaling"), EXACT)
def test_skipped_step_leaves_the_run_that_never_saw_the_batch(
    precision: str, scaling: Any, runs: list[dict[str, Any]]
) -> None:
    for r in runs:
        run = r[f"{precision}/{scaling}"]
        assert run["ref_steps"] == BATCHES - 1 and run["ref_skipped"] == run["skipped"] - 1
        assert run["ref_diff"] == 0.0  # every rank's shards, bit for bit


@pytest.mark.distributed
@pytest.mark.parametrize(("precision", "scaling"), SETTINGS)
def test_scale_and_skips_are_logged_checkpointed_and_resumed(
    precision: str, scaling: Any, runs: list[dict[str, Any]]
) -> None:
    for r in runs:
        run = r[f"{precision}/{scaling}"]
        # Killed after step 6, resumed from the step-4 checkpoint (after the skips): the same weights, count, scale.
        assert run["resumed_diff"] == 0.0
        assert run["resumed_skipped"] == run["skipped"] and run["resumed_scale"] == run["final_scale"]
    run = runs[0][f"{precision}/{scaling}"]
    assert run["logged"]["skipped_steps"] == [float(sum(run["skips"][: i + 1])) for i in range(BATCHES)]
    assert run["logged"]["loss_scale"] == run["scale"]


@pytest.mark.distributed
def test_fsdp_without_loss_scaling_has_no_scaler(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        assert r["unscaled"] == {"skipped": 0, "scale": None, "scaler": "NoneType"}


@pytest.mark.cuda
def test_fsdp_fp16_on_cuda_skips_without_advancing_the_schedule(tmp_path: Path) -> None:
    # One GPU (a one-process FSDP group over NCCL), fused AdamW taking the sharded scaler's flag into its kernel.
    try:
        _, result, rec = fit("16-mixed", "dynamic", skip_bad=False, root=tmp_path, accelerator="cuda", devices=1)
    finally:
        if dist.is_initialized():  # Lightning started a process group in this (pytest's) process
            dist.destroy_process_group()
    assert result.precision.name == "16-mixed" and rec.plugin == "KeelFSDPPrecision"
    assert rec.scaler == "_ShardedGradScaler"
    assert rec.skipped[BAD - 1] and result.skipped_steps == sum(rec.skipped)
    assert rec.sched == [i + 1 - sum(rec.skipped[: i + 1]) for i in range(BATCHES)]
    assert rec.scale == expected_scales("dynamic", rec.skipped)


@pytest.mark.parametrize(("precision", "dtype"), [("16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_fsdp_plugin_has_keels_scaler_and_autocasts_on_the_training_device(precision: str, dtype: torch.dtype) -> None:
    plugin = build_precision_plugin(precision, device_type="cpu", loss_scaling="dynamic", fsdp=True)
    assert isinstance(plugin, KeelFSDPPrecision) and plugin.scaler is None  # Lightning's own scaler is off
    assert isinstance(plugin.keel_scaler, ShardedGradScaler) and plugin.loss_scale == 2.0**16
    assert plugin.mixed_precision_config.param_dtype == dtype  # FSDP computes and reduces in it
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    assert build_precision_plugin("32-true", device_type="cpu", loss_scaling=None, fsdp=True).keel_scaler is None
