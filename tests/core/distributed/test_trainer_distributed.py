"""Keel's Trainer on 2 and 4 CPU processes (gloo, launched by torchrun): DDP and FSDP follow the
one-process loss curve for the same global batch (with weight decay on weights only, FSDP included);
an FSDP run killed and resumed ends with the uninterrupted run's weights; int8 compression ends within
1% of uncompressed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from core.training import Trainer
from core.utils.registry import UnknownNameError
from tests.core.distributed.helpers import torchrun
from tests.core.distributed.train_worker import CKPT_EVERY, EPOCHS, GLOBAL_BATCH, KILL_AT, N, make_data, make_net, mse

CURVE_ATOL = 1e-5  # fp32 sums in another order: equal to a few ulps, step after step


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return torchrun(["single"], nproc=0, out=tmp_path_factory.mktemp("single") / "out.json")["single"]


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("two") / "out.json"
    settings = ["ddp:none", "fsdp:none:ac:ckpt:resume", "ddp:int8", "ddp:none:ac"]
    return torchrun(settings, nproc=2, out=out), out.parent


def assert_same_curve(got: list[float], ref: list[float]) -> None:
    assert len(got) == len(ref) > 10
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < CURVE_ATOL


@pytest.mark.distributed
@pytest.mark.parametrize("setting", ["ddp:none", "fsdp:none:ac:ckpt:resume", "ddp:none:ac"])
def test_two_processes_follow_the_single_process_curve(
    setting: str, single: dict[str, Any], two: tuple[dict[str, Any], Path]
) -> None:
    runs, root = two
    assert_same_curve(runs[setting]["losses"], single["losses"])
    if "ckpt" in setting:  # FSDP gathered a full checkpoint mid-run and at the end
        assert (root / "runs" / setting.replace(":", "_") / "last.ckpt").is_file()


# make_net: Linear, two Blocks (LayerNorm + Linear), Linear. Decay on the matrices only.
DECAYED = ["0.weight", "1.fc.weight", "2.fc.weight", "3.weight"]
NOT_DECAYED = [
    "0.bias",
    "1.fc.bias",
    "1.norm.weight",
    "2.fc.bias",
    "2.norm.weight",
    "3.bias",
]


@pytest.mark.distributed
@pytest.mark.parametrize("setting", ["ddp:none", "fsdp:none:ac:ckpt:resume"])
def test_weight_decay_groups_survive_fsdp_flattening(
    setting: str, single: dict[str, Any], two: tuple[dict[str, Any], Path]
) -> None:
    # Under FSDP every parameter the optimizer sees is a flat 1-D shard; the groups are decided by name.
    expected = [{"weight_decay": 0.1, "names": DECAYED}, {"weight_decay": 0.0, "names": NOT_DECAYED}]
    assert single["groups"] == expected
    assert two[0][setting]["groups"] == expected


@pytest.mark.distributed
def test_fsdp_run_killed_and_resumed_ends_with_the_uninterrupted_weights(two: tuple[dict[str, Any], Path]) -> None:
    run = two[0]["fsdp:none:ac:ckpt:resume"]
    steps = EPOCHS * N // GLOBAL_BATCH
    checkpoint = KILL_AT // CKPT_EVERY * CKPT_EVERY  # the last checkpoint before the kill, mid-epoch
    assert checkpoint % (N // GLOBAL_BATCH) != 0 and checkpoint < KILL_AT
    assert run["resumed_from_step"] == checkpoint  # resumed, not restarted from scratch
    assert run["resumed_losses"] == pytest.approx(run["losses"][checkpoint:], abs=1e-7)
    assert len(run["resumed_losses"]) == steps - checkpoint
    assert run["resume_max_diff"] <= 1e-7  # every rank's shards, after the last step


@pytest.mark.distributed
def test_int8_ends_within_one_percent_of_uncompressed(two: tuple[dict[str, Any], Path]) -> None:
    runs, _ = two
    none, int8 = runs["ddp:none"], runs["ddp:int8"]
    assert abs(int8["final_loss"] - none["final_loss"]) <= 0.01 * none["final_loss"]
    assert int8["losses"] != none["losses"]  # it really went through int8
    assert int8["ratio"] >= 3.5 and none["ratio"] == 1.0
    assert none["bytes_sent"] / int8["bytes_sent"] == pytest.approx(int8["ratio"])


@pytest.mark.distributed
@pytest.mark.slow
def test_four_processes_follow_the_single_process_curve(single: dict[str, Any], tmp_path: Path) -> None:
    runs = torchrun(["ddp:none", "fsdp:none"], nproc=4, out=tmp_path / "out.json")
    for run in runs.values():
        assert run["world"] == 4
        assert_same_curve(run["losses"], single["losses"])


def test_activation_checkpointing_changes_memory_not_results(tmp_path: Path) -> None:
    def fit(ac: bool) -> list[torch.Tensor]:
        trainer = Trainer(
            make_net(),
            loss_fn=mse,
            precision="32-true",
            activation_checkpointing=ac,
            progress=False,
            checkpoint_dir=tmp_path / str(ac),
            max_epochs=1,
            log_every_n_steps=1,
        )
        trainer.train(make_data(), batch_size=16)
        assert trainer.config.activation_checkpointing == (("Block",) if ac else ())
        return [p.detach().clone() for p in trainer.model.state_dict().values()]

    plain, checkpointed = fit(False), fit(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"strategy": "zero3"}, ValueError, "strategy must be one of auto, ddp, fsdp"),
        ({"compression": "int4"}, UnknownNameError, "unknown gradient compression 'int4'; known: bf16, fp16"),
        ({"strategy": "fsdp", "compression": "int8"}, ValueError, "DDP communication hook"),
        ({"num_nodes": 0}, ValueError, "num_nodes >= 1"),
        ({"activation_checkpointing": [int]}, TypeError, "nn.Module classes"),
    ],
)
def test_bad_distributed_settings_fail_fast(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Trainer(make_net(), loss_fn=mse, **kwargs)


def test_activation_checkpointing_needs_blocks_it_can_find() -> None:
    with pytest.raises(ValueError, match="found no repeated blocks in Linear"):
        Trainer(nn.Linear(3, 1), loss_fn=mse, activation_checkpointing=True)
