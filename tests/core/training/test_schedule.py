"""SkipAwareCosine: the same rates on the device and on the host, no advance on a skipped step; the optimizer's
weight-decay groups by name, which survive FSDP flattening the parameters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.training.module import build_optimizer, build_scheduler, no_decay_names
from core.training.schedule import SkipAwareCosine


def _optimizer(tensor_lr: bool) -> torch.optim.AdamW:
    p = nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([p], lr=torch.tensor(0.1) if tensor_lr else 0.1, fused=tensor_lr or None)


def _reference(step: int, warmup: int = 3, total: int = 10) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


@pytest.mark.parametrize("tensor_lr", [True, False])
def test_rates_follow_warmup_then_cosine_and_skip_on_inf(tensor_lr: bool) -> None:
    opt = _optimizer(tensor_lr)
    sched = SkipAwareCosine(opt, warmup_steps=3, total_steps=10)
    assert sched.on_device is tensor_lr
    lrs = [float(opt.param_groups[0]["lr"])]
    for step in range(12):
        flag = torch.tensor(1.0 if step == 4 else 0.0)  # the 5th step was skipped by the scaler
        sched.step(flag)
        lrs.append(float(opt.param_groups[0]["lr"]))
    applied = [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11]
    assert lrs == pytest.approx([0.1 * _reference(s) for s in applied], rel=1e-6, abs=1e-9)
    assert sched.last_epoch == 11


def test_state_round_trip_and_earlier_lambdalr_checkpoints() -> None:
    opt = _optimizer(True)
    sched = SkipAwareCosine(opt, warmup_steps=3, total_steps=10)
    for _ in range(5):
        sched.step()
    fresh = SkipAwareCosine(_optimizer(True), warmup_steps=3, total_steps=10)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.last_epoch == 5 and fresh.get_last_lr() == pytest.approx(sched.get_last_lr())
    fresh.load_state_dict({"last_epoch": 7, "base_lrs": [0.1]})  # a LambdaLR state from an older checkpoint
    assert fresh.get_last_lr() == pytest.approx([0.1 * _reference(7)])


def test_bad_horizon_is_refused() -> None:
    with pytest.raises(ValueError, match="total_steps >= 1"):
        SkipAwareCosine(_optimizer(False), warmup_steps=0, total_steps=0)
    with pytest.raises(ValueError, match="scheduler must be"):
        build_scheduler(_optimizer(False), name="step", warmup_steps=0, total_steps=5)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 1, bias=False)


def _groups(opt: torch.optim.Optimizer, net: nn.Module) -> list[tuple[float, list[str]]]:
    names = {id(p): n for n, p in net.named_parameters()}
    return [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups]


def test_groups_are_decided_by_name_so_flattened_parameters_keep_them() -> None:
    net = Net()
    no_decay = no_decay_names(net)
    assert no_decay == {"fc.bias", "norm.weight", "norm.bias"}
    expected = [(0.1, ["fc.weight", "head.weight"]), (0.0, ["fc.bias", "norm.bias", "norm.weight"])]
    assert _groups(build_optimizer(net, lr=1e-3, weight_decay=0.1), net) == expected
    for p in net.parameters():  # what FSDP does to every parameter: a flat 1-D shard
        p.data = p.data.flatten()
    assert _groups(build_optimizer(net, lr=1e-3, weight_decay=0.1, no_decay=no_decay), net) == expected
    # Deciding by shape now would lose every matrix's decay: the bug this guards against.
    assert _groups(build_optimizer(net, lr=1e-3, weight_decay=0.1), net)[0] == (0.1, [])


def test_wrapper_prefixes_are_ignored_and_unknown_names_refused() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    net = Net()
    no_decay = no_decay_names(net)
    wrapped = nn.Sequential()
    wrapped.add_module("_fsdp_wrapped_module", checkpoint_wrapper(net))  # names as nested FSDP units show them
    opt = build_optimizer(wrapped, lr=1e-3, weight_decay=0.1, no_decay=no_decay, fused=True)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 3]
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # fused: the rate lives with the parameters
    with pytest.raises(ValueError, match="no_decay names parameters the model does not have: flat_param"):
        build_optimizer(net, lr=1e-3, weight_decay=0.1, no_decay=frozenset({"flat_param"}))
