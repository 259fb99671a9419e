"""Checkpoint / resume on CPU: a killed or stopped run, resumed, ends with the same weights as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.registry import ModelRegistry, fingerprint_arrays
from core.training import Trainer
from tests.core.training.helpers import Kill, make_dataset, make_net, mse

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

EPOCHS, BATCH = 2, 4  # 40 samples -> 10 batches per epoch, 20 steps


def _trainer(ckpt_dir: Path, **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_epochs", EPOCHS)
    return Trainer(
        make_net(),
        loss_fn=mse,
        checkpoint_dir=ckpt_dir,
        checkpoint_every_n_steps=3,
        warmup_steps=3,
        progress=False,
        log_every_n_steps=1,
        **kwargs,
    )


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[torch.Tensor]:
    trainer = _trainer(tmp_path_factory.mktemp("ref"))
    result = trainer.train(make_dataset(), batch_size=BATCH)
    assert result.global_step == 20
    return _weights(trainer)


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert all(torch.allclose(x, y, atol=1e-6, rtol=0) for x, y in zip(a, b, strict=True))


def test_resume_after_a_mid_epoch_kill(tmp_path: Path, reference: list[torch.Tensor]) -> None:
    with pytest.raises(RuntimeError, match="simulated kill"):
        _trainer(tmp_path, callbacks=[Kill(at_step=14)]).train(make_dataset(), batch_size=BATCH)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 12  # the step-12 checkpoint, mid-way through epoch 2
    resumed = _trainer(tmp_path, resume=True)
    result = resumed.train(make_dataset(), batch_size=BATCH)
    assert result.global_step == 20 and result.epoch == EPOCHS
    _assert_equal(_weights(resumed), reference)


def test_resume_after_max_steps_stop(tmp_path: Path) -> None:
    # max_steps also sets the cosine horizon, so this pair of runs uses a constant LR.
    reference = _trainer(tmp_path / "ref", scheduler="none")
    reference.train(make_dataset(), batch_size=BATCH)
    _trainer(tmp_path / "run", scheduler="none", max_steps=7).train(make_dataset(), batch_size=BATCH)
    resumed = _trainer(tmp_path / "run", scheduler="none", resume=True)
    assert resumed.train(make_dataset(), batch_size=BATCH).global_step == 20
    _assert_equal(_weights(resumed), _weights(reference))


def test_resume_from_epoch_boundary(tmp_path: Path, reference: list[torch.Tensor]) -> None:
    with pytest.raises(RuntimeError):
        _trainer(tmp_path, callbacks=[Kill(at_step=11)]).train(make_dataset(), batch_size=BATCH)
    resumed = _trainer(tmp_path, resume=True)  # last.ckpt is at step 9: the epoch's last batch is still to come
    resumed.train(make_dataset(), batch_size=BATCH)
    _assert_equal(_weights(resumed), reference)


def test_interrupted_run_differs_without_resume(tmp_path: Path, reference: list[torch.Tensor]) -> None:
    # Guards the tests above against passing trivially: a fresh shorter run does not match.
    trainer = _trainer(tmp_path, max_steps=12)
    trainer.train(make_dataset(), batch_size=BATCH)
    assert not all(torch.allclose(x, y, atol=1e-6) for x, y in zip(_weights(trainer), reference, strict=True))


def test_checkpoint_holds_config_and_scaler(tmp_path: Path) -> None:
    result = _trainer(tmp_path, max_steps=4).train(make_dataset(), batch_size=BATCH)
    assert result.checkpoint_path == tmp_path / "last.ckpt"
    ckpt = torch.load(result.checkpoint_path, weights_only=True)  # safe types only
    assert ckpt["keel_config"]["precision_resolved"] == "32-true"
    assert ckpt["keel_config"]["checkpoint_every_n_steps"] == 3
    assert ckpt["KeelPrecision32"]["scaler"]["scale"] == 2.0**16
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temp files behind
    header = next(tmp_path.glob("logs/version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"loss_scale", "skipped_steps", "lr", "train_loss"} <= set(header)


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    result = _trainer(tmp_path, resume=True, max_steps=2).train(make_dataset(), batch_size=BATCH)
    assert result.global_step == 2


def test_registers_the_trained_model(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "reg")
    data = make_dataset()
    trainer = Trainer(
        make_net(), loss_fn=mse, max_steps=3, progress=False, log_every_n_steps=1, registry=registry, register_as="toy"
    )
    result = trainer.train(data, val=make_dataset(8), batch_size=BATCH)
    mv = result.model_version
    assert mv is not None and mv.ref == "toy@1"
    assert mv.data_fingerprint == fingerprint_arrays(*data.tensors)
    assert mv.config["precision_resolved"] == "32-true" and mv.config["batch_size"] == BATCH
    assert set(mv.metrics) == {"train_loss", "val_loss"} and mv.metrics == result.metrics
    _, state = registry.load("toy")
    fresh = make_net()
    fresh.load_state_dict(state)
    _assert_equal(list(fresh.parameters()), _weights(trainer))
