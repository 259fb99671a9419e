"""Host-device syncs in the Trainer's step: none for fp32, bf16 and fp16 with Keel's fused AdamW, counted on CPU."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from core.training import SpeedConfig, Trainer
from core.training.syncs import HostSyncCounter, SyncsPerStep
from tests.core.training.helpers import make_dataset, make_net, mse

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def test_counter_sees_host_reads_and_nothing_else() -> None:
    t = torch.ones(3)
    with HostSyncCounter() as counter:
        u = (t * 2).sum()  # stays a tensor: no sync
        torch.where(u > 0, u, -u)
    assert counter.syncs == []
    with HostSyncCounter() as counter:
        u.item()
        float(u)
        bool(u > 0)
        torch.nonzero(t)
    assert [s.op for s in counter.syncs] == ["_local_scalar_dense"] * 3 + ["nonzero"]
    assert counter.keel_syncs == []  # read by this test, not by Keel's code
    assert "test_syncs.py" in counter.syncs[0].frame


def _syncs_per_step(**kwargs: object) -> list[list]:
    counter = SyncsPerStep()
    trainer = Trainer(
        make_net(),
        loss_fn=mse,
        max_steps=6,
        warmup_steps=2,
        progress=False,
        log_every_n_steps=10,  # logging steps read values on purpose: none among these 6 of 10 batches
        callbacks=[counter],
        **kwargs,  # type: ignore[arg-type]
    )
    trainer.train(make_dataset(), batch_size=4)
    assert len(counter.steps) == 5
    return counter.steps[1:]  # the first step builds the optimizer state


@pytest.mark.parametrize(
    ("precision", "loss_scaling"),
    [("32-true", "dynamic"), ("bf16-mixed", "dynamic"), ("16-mixed", "dynamic"), ("32-true", None)],
)
def test_training_steps_never_wait_for_the_device(precision: str, loss_scaling: str | None) -> None:
    # The inf/NaN guard, the skip-aware schedule, the logged loss and Lightning's loop around them.
    for syncs in _syncs_per_step(precision=precision, loss_scaling=loss_scaling):
        assert syncs == [], [str(s) for s in syncs]


def test_without_the_fused_optimizer_the_skip_check_reads_the_flag() -> None:
    # The documented exception, and proof the counter sees Keel's own reads: a Python-float LR schedule and
    # GradScaler's own step both need to know on the host whether the step was skipped.
    steps = _syncs_per_step(precision="32-true", speed=SpeedConfig(fused_adamw=False))
    where = {s.keel_frame.split(":")[0].rsplit("/", 1)[-1] for step in steps for s in step if s.keel_frame}
    assert where == {"scaling.py", "schedule.py"}


class CudaSyncErrors(pl.Callback):
    """Makes every implicit CUDA sync an error from the start of batch ``first`` to the start of batch ``last``."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.checked = first, last, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.last:
            torch.cuda.set_sync_debug_mode(0)
        if self.first <= idx < self.last:
            self.checked += 1
            torch.cuda.set_sync_debug_mode("error")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_cuda_reports_no_sync_in_training_steps(precision: str) -> None:
    guard = CudaSyncErrors(first=2, last=5)
    try:
        Trainer(
            make_net(),
            loss_fn=mse,
            precision=precision,
            accelerator="cuda",
            speed=SpeedConfig(compile=False),  # seconds, not a compile per precision; the step path is the same
            max_steps=6,
            progress=False,
            log_every_n_steps=10,
            callbacks=[guard],
        ).train(make_dataset(), batch_size=4)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert guard.checked == 3
