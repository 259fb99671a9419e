"""Trains a tiny MLP with Keel's Trainer under every requested setting; run by the tests with torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/core/distributed/train_worker.py \
        --out OUT.json --setting ddp:none --setting fsdp:none --setting ddp:int8

Each ``--setting STRATEGY:COMPRESSION[:ac][:ckpt][:resume]`` trains from the same initial weights on the
same data with the same global batch (``ac``: activation checkpointing; ``ckpt``: write checkpoints;
``resume``: also train a second time, killed after ``KILL_AT`` steps and resumed from its last checkpoint).
Rank 0 writes every run's per-step loss (the mean over ranks, i.e. the global-batch loss), the loss on the
whole data set at the end (DDP and single runs), the bytes rank 0 sent, the compression ratio and the
optimizer's parameter groups (weight decay and parameter names) to ``--out``. ``single`` trains in one
process with the whole global batch (run it without torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from core.training import Trainer  # noqa: E402
from core.training.module import original_name  # noqa: E402
from tests.core.training.helpers import Kill  # noqa: E402

N, GLOBAL_BATCH, EPOCHS, LR = 128, 16, 6, 1e-2
WEIGHT_DECAY = 0.1  # large enough that a wrong no-decay group moves the loss curve well past the tolerance
CKPT_EVERY, KILL_AT = 4, 22  # 8 steps per epoch: the kill loses 2 steps after the step-20 checkpoint, mid-epoch


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g)) + 0.05 * torch.randn(N, 1, generator=g)
    return TensorDataset(x, y)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        # No bias: 2,497 parameters fill int8's 256-element chunks as before the norm was added (ratio >= 3.5).
        self.norm = nn.LayerNorm(width, bias=False)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


def make_net() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(8, 32), Block(32), Block(32), nn.Linear(32, 1))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


class GlobalLoss(pl.Callback):
    """Per step, the mean of the ranks' losses: the loss of the global batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.groups: list[dict[str, Any]] = []
        self.start_step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach().float().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(float(loss))

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.start_step = trainer.global_step
        names = {id(p): original_name(n) for n, p in pl_module.model.named_parameters()}
        self.groups = [
            {"weight_decay": g["weight_decay"], "names": sorted(names[id(p)] for p in g["params"])}
            for g in trainer.optimizers[0].param_groups
        ]


def fit(
    run: str, ckpt_dir: Path | None, *, resume: bool = False, kill_at: int | None = None
) -> tuple[Trainer, GlobalLoss]:
    strategy, *rest = run.split(":")
    compression, flags = (rest[0] if rest else "none"), rest[1:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    single = strategy == "single"
    recorder = GlobalLoss()
    trainer = Trainer(
        make_net(),
        loss_fn=mse,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        scheduler="cosine",  # decays to 0: the final loss is where training settled, not a noisy last step
        precision="32-true",  # "auto" may pick bf16 on this CPU; the comparison is exact arithmetic
        max_epochs=EPOCHS,
        devices=1 if single else world,
        strategy="auto" if single else strategy,
        compression=compression,
        activation_checkpointing="ac" in flags,
        checkpoint_dir=ckpt_dir,
        checkpoint_every_n_steps=CKPT_EVERY if ckpt_dir is not None else None,
        resume=resume,
        progress=False,
        log_every_n_steps=1,
        callbacks=[recorder] if kill_at is None else [recorder, Kill(kill_at)],
        accelerator="cpu",
    )
    # Keel's loader: every rank draws the single process's order from (seed, epoch) and takes its interleaved
    # share, so rank r's i-th batch is the r-th share of the single process's i-th (shuffled) batch.
    trainer.train(make_data(), batch_size=GLOBAL_BATCH if single else GLOBAL_BATCH // world)
    return trainer, recorder


def local_weights(trainer: Trainer) -> list[torch.Tensor]:
    """This rank's parameters (under FSDP: its flat shards, the same layout in every run)."""
    return [p.detach().clone() for p in trainer.module.parameters()]


def train(run: str, root: Path) -> dict[str, Any]:
    strategy, *rest = run.split(":")
    flags = rest[1:]
    name = run.replace(":", "_")
    trainer, recorder = fit(run, root / name if "ckpt" in flags or "resume" in flags else None)
    comm = trainer.comm
    final = None
    if strategy != "fsdp":  # under FSDP the module holds only this rank's shard
        with torch.no_grad():
            final = float(mse(trainer.model, make_data().tensors))
    out = {
        "losses": recorder.losses,
        "final_loss": final,
        "bytes_sent": comm.state.bytes_sent if comm else 0,
        "ratio": comm.state.ratio if comm else 1.0,
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "groups": recorder.groups,
    }
    if "resume" in flags:
        out.update(interrupted_and_resumed(run, root / f"{name}_killed", local_weights(trainer)))
    return out


def interrupted_and_resumed(run: str, ckpt_dir: Path, reference: list[torch.Tensor]) -> dict[str, Any]:
    """Kill a run after ``KILL_AT`` steps, resume it from ``last.ckpt``; compare with the uninterrupted weights."""
    try:
        fit(run, ckpt_dir, kill_at=KILL_AT)
    except RuntimeError as err:
        if "simulated kill" not in str(err):
            raise
    else:
        raise AssertionError("the run was not killed")
    trainer, recorder = fit(run, ckpt_dir, resume=True)
    diff = torch.tensor(
        max(
            (float((a - b).abs().max()) if a.numel() else 0.0)
            for a, b in zip(local_weights(trainer), reference, strict=True)
        )
    )
    if dist.is_initialized():
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return {"resumed_from_step": recorder.start_step, "resumed_losses": recorder.losses, "resume_max_diff": float(diff)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--setting", action="append", required=True, help="STRATEGY:COMPRESSION, or 'single'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {run: train(run, args.out.parent / "runs") for run in args.setting}
    if int(os.environ.get("RANK", "0")) == 0:
        args.out.write_text(json.dumps(results))
    # Leave without the interpreter's teardown: with 4 gloo processes on 2 cores, C++ threads still alive at
    # static destruction occasionally abort the process ("terminate called without an active exception")
    # after the work is done, which torchrun reports as a failure.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
