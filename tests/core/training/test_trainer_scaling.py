"""Loss scaling on CPU: an inf step is skipped, the scheduler stays put, the scale backs off."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.training import Trainer
from tests.core.training.helpers import make_dataset, make_net, mse

# Lightning 2.6 + torch 2.14: Lightning's pytree helper triggers torch's LeafSpec FutureWarning.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


@pytest.fixture
def dataset() -> TensorDataset:
    return make_dataset()


BAD_CALL = 3  # the 3rd training batch gets an infinite loss


class Recorder(pl.Callback):
    """Weights and scheduler step count after every training batch, keyed by batch number (1-based)."""

    def __init__(self) -> None:
        self.weights: dict[int, list[torch.Tensor]] = {}
        self.sched_steps: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        n = len(self.weights) + 1
        self.weights[n] = [p.detach().clone() for p in pl_module.parameters()]
        self.sched_steps[n] = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def poisoned_mse() -> Any:
    calls = {"n": 0}

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = mse(model, batch)
        return loss * float("inf") if calls["n"] == BAD_CALL else loss

    return loss_fn


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("loss_scaling", "final_scale"), [("dynamic", 2.0**15), (128.0, 128.0)])
def test_inf_step_is_skipped_without_advancing_the_scheduler(
    dataset: TensorDataset, loss_scaling: Any, final_scale: float
) -> None:
    rec = Recorder()
    trainer = Trainer(
        make_net(),
        loss_fn=poisoned_mse(),
        loss_scaling=loss_scaling,
        max_steps=6,
        max_epochs=5,
        warmup_steps=2,
        progress=False,
        log_every_n_steps=1,
        callbacks=[rec],
    )
    result = trainer.train(dataset, batch_size=4)
    assert result.skipped_steps == 1
    assert result.loss_scale == final_scale
    assert _same(rec.weights[BAD_CALL - 1], rec.weights[BAD_CALL])  # the poisoned step changed nothing
    assert not _same(rec.weights[BAD_CALL], rec.weights[BAD_CALL + 1])  # training went on afterwards
    assert rec.sched_steps[BAD_CALL] == rec.sched_steps[BAD_CALL - 1] == BAD_CALL - 1
    assert rec.sched_steps[6] == 5  # 6 batches, 5 real optimizer steps
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


class AutoModule(pl.LightningModule):
    """A user LightningModule with automatic optimization and a per-step scheduler."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.loss_fn = poisoned_mse()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_fn(self.net, batch)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lightning_module_scheduler_also_skips(dataset: TensorDataset) -> None:
    rec = Recorder()
    module = AutoModule()
    result = Trainer(module, max_steps=5, progress=False, log_every_n_steps=1, callbacks=[rec]).train(
        dataset, batch_size=4
    )
    assert result.skipped_steps == 1 and result.loss_scale == 2.0**15
    assert rec.sched_steps[BAD_CALL] == rec.sched_steps[BAD_CALL - 1]
    assert _same(rec.weights[BAD_CALL - 1], rec.weights[BAD_CALL])
    assert rec.sched_steps[5] == 4


def test_without_scaling_nothing_is_skipped(dataset: TensorDataset) -> None:
    result = Trainer(
        make_net(), loss_fn=mse, loss_scaling=None, max_steps=3, progress=False, log_every_n_steps=1
    ).train(dataset, batch_size=4)
    assert result.skipped_steps == 0 and result.loss_scale is None


def test_bf16_mixed_trains_on_cpu(dataset: TensorDataset) -> None:
    result = Trainer(
        make_net(), loss_fn=mse, precision="bf16-mixed", max_steps=4, progress=False, log_every_n_steps=1
    ).train(dataset, batch_size=4)
    assert result.precision.name == "bf16-mixed"
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"]))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"loss_scaling": "static"}, "loss_scaling must be"),
        ({"loss_scaling": -1.0}, "loss_scaling must be"),
        ({"scheduler": "step"}, "scheduler must be"),
        ({"resume": True}, "resume=True needs checkpoint_dir"),
        ({"precision": "fp8"}, "unknown precision"),
        ({"checkpoint_dir": "x", "checkpoint_every_n_steps": 0}, "checkpoint_every_n_steps"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises((ValueError, KeyError), match=error):
        Trainer(make_net(), loss_fn=mse, **kwargs)


def test_model_contract_is_checked() -> None:
    with pytest.raises(TypeError, match="needs loss_fn"):
        Trainer(make_net())
    with pytest.raises(TypeError, match="nn.Module or LightningModule"):
        Trainer("resnet50", loss_fn=mse)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_fn is for plain"):
        Trainer(AutoModule(), loss_fn=mse)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_inf_step_is_skipped_on_cuda_with_fused_adamw(
    dataset: TensorDataset, precision: str, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    trainer = Trainer(
        make_net(),
        loss_fn=poisoned_mse(),
        precision=precision,
        accelerator="cuda",
        max_steps=6,
        progress=False,
        log_every_n_steps=1,
        callbacks=[rec],
    )
    with caplog.at_level(logging.INFO, logger="core.training"):
        result = trainer.train(dataset, batch_size=4)
    assert "fused=True" in caplog.text and result.precision.name == precision
    assert result.skipped_steps == 1 and result.loss_scale == 2.0**15
    assert _same(rec.weights[BAD_CALL - 1], rec.weights[BAD_CALL])
    assert rec.sched_steps[6] == 5


class TinyData(pl.LightningDataModule):
    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(make_dataset(), batch_size=4)

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(make_dataset(8), batch_size=4)


def test_datamodule_input() -> None:
    result = Trainer(make_net(), loss_fn=mse, max_epochs=1, progress=False, log_every_n_steps=1).train(TinyData())
    assert result.global_step == 10 and "val_loss" in result.metrics
