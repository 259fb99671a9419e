"""Trains a tiny MLP with Keel's Trainer under every requested setting; run by the tests with torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/core/distributed/train_worker.py \
        --out OUT.json --setting ddp:none --setting fsdp:none --setting ddp:int8

Each ``--setting STRATEGY:COMPRESSION[:ac][:ckpt]`` trains from the same initial weights on the same data
with the same global batch (``ac``: activation checkpointing; ``ckpt``: write checkpoints). Rank 0 writes
every run's per-step loss (the mean over ranks, i.e. the global-batch loss), the loss on the whole data set
at the end (DDP and single runs), the bytes rank 0 sent and the compression ratio to ``--out``.
``single`` trains in one process with the whole global batch (run it without torchrun).
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
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from core.training import Trainer  # noqa: E402

N, GLOBAL_BATCH, EPOCHS, LR = 128, 16, 6, 1e-2


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g)) + 0.05 * torch.randn(N, 1, generator=g)
    return TensorDataset(x, y)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


def make_net() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(8, 32), Block(32), Block(32), nn.Linear(32, 1))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


class GlobalLoss(pl.Callback):
    """Per step, the mean of the ranks' losses: the loss of the global batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach().float().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(float(loss))


def train(run: str, root: Path) -> dict[str, Any]:
    strategy, *rest = run.split(":")
    compression, flags = (rest[0] if rest else "none"), rest[1:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    single = strategy == "single"
    recorder = GlobalLoss()
    trainer = Trainer(
        make_net(),
        loss_fn=mse,
        lr=LR,
        weight_decay=0.0,  # under FSDP every parameter is a flat 1-D shard: build_optimizer's ndim split sees no matrix
        scheduler="cosine",  # decays to 0: the final loss is where training settled, not a noisy last step
        precision="32-true",  # "auto" may pick bf16 on this CPU; the comparison is exact arithmetic
        max_epochs=EPOCHS,
        devices=1 if single else world,
        strategy="auto" if single else strategy,
        compression=compression,
        activation_checkpointing="ac" in flags,
        checkpoint_dir=root / run.replace(":", "_") if "ckpt" in flags else None,
        progress=False,
        log_every_n_steps=1,
        callbacks=[recorder],
        accelerator="cpu",
    )
    # In order: rank r's i-th batch is then the r-th interleaved share of the single process's i-th batch.
    data = make_data()
    rank = int(os.environ.get("RANK", "0"))
    sampler = None if single else DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH if single else GLOBAL_BATCH // world, sampler=sampler)
    trainer.train(loader)
    comm = trainer.comm
    final = None
    if strategy != "fsdp":  # under FSDP the module holds only this rank's shard
        with torch.no_grad():
            final = float(mse(trainer.model, data.tensors))
    return {
        "losses": recorder.losses,
        "final_loss": final,
        "bytes_sent": comm.state.bytes_sent if comm else 0,
        "ratio": comm.state.ratio if comm else 1.0,
        "world": world,
    }


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
