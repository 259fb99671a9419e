"""Speed defaults: the pure decisions on fake devices, each switch turned off, and what the Trainer applies."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from core.config import keel_home
from core.training import DeviceInfo, SpeedConfig, ThroughputMeter, Trainer, resolve_precision, resolve_speed
from core.training import precision as precision_mod
from core.training.callbacks import logging_step
from core.training.precision import CPU_BF16_MIN_PARAMS, cpu_bf16_candidate, cpu_bf16_speedup, detect_device
from core.training.speed import SPEED_SWITCHES, backend_flags, channels_last_batch, is_conv_net, prepare_model
from tests.core.training.helpers import make_dataset, make_net, mse

H200 = DeviceInfo(type="cuda", name="NVIDIA H200", capability=(9, 0), bf16_supported=True)
T4 = DeviceInfo(type="cuda", name="Tesla T4", capability=(7, 5))
P100 = DeviceInfo(type="cuda", name="Tesla P100", capability=(6, 0))
CPU = DeviceInfo(type="cpu", name="cpu", bf16_supported=True)
MPS = DeviceInfo(type="mps", name="mps")


def _on(device: DeviceInfo, *, conv_net: bool, config: SpeedConfig | None = None) -> set[str]:
    plan = resolve_speed(config or SpeedConfig(), device, conv_net=conv_net)
    return {d.name for d in plan.decisions if d.enabled}


@pytest.mark.parametrize(
    ("device", "conv_net", "expected"),
    [
        (H200, True, set(SPEED_SWITCHES)),
        (H200, False, {"tf32", "fused_adamw", "compile"}),
        (T4, True, {"cudnn_benchmark", "channels_last", "fused_adamw", "compile"}),  # no TF32 before sm_80
        (P100, False, {"fused_adamw"}),  # no Triton (torch.compile) before sm_70
        (CPU, True, {"channels_last", "fused_adamw"}),
        (CPU, False, {"fused_adamw"}),
        (MPS, True, set()),
        (dataclasses.replace(H200, c_compiler=False), False, {"tf32", "fused_adamw"}),  # compile needs a C compiler
    ],
)
def test_auto_decisions(device: DeviceInfo, conv_net: bool, expected: set[str]) -> None:
    assert _on(device, conv_net=conv_net) == expected


def test_every_decision_has_a_reason_and_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    plan = resolve_speed(SpeedConfig(), H200, conv_net=True)
    assert [d.name for d in plan.decisions] == list(SPEED_SWITCHES)
    assert all("NVIDIA H200 (sm_90)" in d.reason for d in plan.decisions)
    with caplog.at_level(logging.INFO, logger="core.training.speed"):
        plan.log()
    assert len(caplog.records) == len(SPEED_SWITCHES)
    assert "compile=on (NVIDIA H200 (sm_90): torch.compile" in caplog.text


@pytest.mark.parametrize("name", SPEED_SWITCHES)
def test_each_switch_turns_off_alone(name: str) -> None:
    on = _on(H200, conv_net=True, config=SpeedConfig(**{name: False}))
    assert on == set(SPEED_SWITCHES) - {name}
    plan = resolve_speed(SpeedConfig(**{name: False}), H200, conv_net=True)
    assert plan.decisions[SPEED_SWITCHES.index(name)].reason == "switched off by SpeedConfig"


def test_off_turns_everything_off_and_true_forces() -> None:
    assert _on(H200, conv_net=True, config=SpeedConfig.off()) == set()
    forced = resolve_speed(SpeedConfig(compile=True), CPU, conv_net=False)
    assert forced.enabled("compile") and "forced on by SpeedConfig" in str(forced.decisions[-1])


def test_bad_config_and_unknown_switch() -> None:
    with pytest.raises(TypeError, match="SpeedConfig.compile must be None"):
        SpeedConfig(compile="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        SpeedConfig(compile_mode="fastest")
    with pytest.raises(TypeError, match="speed must be a SpeedConfig"):
        Trainer(make_net(), loss_fn=mse, speed={"compile": False})  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="known: tf32, cudnn_benchmark"):
        resolve_speed(SpeedConfig(), CPU, conv_net=False).enabled("cuda_graphs")


def test_backend_flags_apply_and_restore() -> None:
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    with backend_flags(resolve_speed(SpeedConfig(), H200, conv_net=True)):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
        assert torch._dynamo.config.suppress_errors  # a graph that fails to compile falls back to eager
    with backend_flags(resolve_speed(SpeedConfig(tf32=False), H200, conv_net=True)):
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    after = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    assert after == before and not torch._dynamo.config.suppress_errors


def test_prepare_model_compiles_in_place_once() -> None:
    net = make_net()
    keys = list(net.state_dict())
    plan = resolve_speed(SpeedConfig(compile=True), CPU, conv_net=False)
    assert prepare_model(net, plan) is net and net._compiled_call_impl is not None
    compiled = net._compiled_call_impl
    prepare_model(net, plan)
    assert net._compiled_call_impl is compiled and list(net.state_dict()) == keys
    plain = make_net()
    prepare_model(plain, resolve_speed(SpeedConfig(), CPU, conv_net=False))
    assert plain._compiled_call_impl is None


def test_channels_last_batch_converts_only_images() -> None:
    images, labels, flat = torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), torch.randn(2, 5)
    out = channels_last_batch({"x": [images, flat], "y": labels})
    assert out["x"][0].is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous(
        memory_format=torch.channels_last
    )
    assert out["x"][1] is flat and out["y"] is labels


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _images(n: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(2, (n,), generator=g))


def _xent(*, channels_last: bool) -> Any:
    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last  # the inputs, too
        return F.cross_entropy(model(x), y)

    return loss


@pytest.mark.parametrize("speed", [None, SpeedConfig(channels_last=False, fused_adamw=False)])
def test_trainer_applies_and_switches_off_on_cpu(speed: SpeedConfig | None, caplog: pytest.LogCaptureFixture) -> None:
    on = speed is None
    net = _conv_net()
    trainer = Trainer(
        net, loss_fn=_xent(channels_last=on), max_steps=2, progress=False, log_every_n_steps=1, speed=speed
    )
    with caplog.at_level(logging.INFO, logger="core.training"):
        result = trainer.train(_images(), batch_size=4)
    assert is_conv_net(net) and net[0].weight.is_contiguous(memory_format=torch.channels_last) == on
    assert f"fused={on}" in caplog.text
    assert f"speed: channels_last={'on' if on else 'off'}" in caplog.text
    assert result.config["speed"]["channels_last"] is on and result.config["speed"]["compile"] is False


def test_throughput_meter_counts_windows_after_warmup() -> None:
    meter = ThroughputMeter(warmup_steps=2, window_steps=3)
    Trainer(make_net(), loss_fn=mse, max_steps=10, progress=False, log_every_n_steps=1, callbacks=[meter]).train(
        make_dataset(40), batch_size=4
    )
    assert [w.steps for w in meter.windows] == [3, 3, 2]  # 10 steps: 2 warm-up, two full windows, the rest
    assert sum(w.items for w in meter.windows) == 8 * 4 and meter.items_per_s > 0
    tokens = ThroughputMeter(warmup_steps=0, window_steps=None, items_fn=lambda b: b[0].numel())
    Trainer(make_net(), loss_fn=mse, max_steps=3, progress=False, log_every_n_steps=1, callbacks=[tokens]).train(
        make_dataset(), batch_size=4
    )
    assert [(w.steps, w.items) for w in tokens.windows] == [(3, 3 * 4 * 6)]
    with pytest.raises(ValueError, match="warmup_steps >= 0"):
        ThroughputMeter(warmup_steps=-1)


@pytest.mark.parametrize(
    ("step", "every", "stop", "expected"), [(100, 50, False, True), (101, 50, False, False), (101, 50, True, True)]
)
def test_python_numbers_are_logged_on_logging_steps_only(step: int, every: int, stop: bool, expected: bool) -> None:
    trainer = SimpleNamespace(global_step=step, log_every_n_steps=every, should_stop=stop)
    assert logging_step(trainer) is expected  # type: ignore[arg-type]


def test_throughput_meter_reads_its_clock_at_window_edges_only() -> None:
    ticks = iter(range(100))
    meter = ThroughputMeter(warmup_steps=1, window_steps=2, clock=lambda: float(next(ticks)))
    Trainer(make_net(), loss_fn=mse, max_steps=5, progress=False, log_every_n_steps=1, callbacks=[meter]).train(
        make_dataset(), batch_size=4
    )
    # windows open at ticks 0 and 2, close at ticks 1 and 3: one second each, 2 steps of 4 items
    assert [(w.steps, w.items, w.seconds) for w in meter.windows] == [(2, 8, 1.0), (2, 8, 1.0)]
    assert meter.items_per_s == 8.0 and meter.windows[0].step_s == 0.5


class _Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1000, CPU_BF16_MIN_PARAMS // 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.fixture
def fresh_speedup(monkeypatch: pytest.MonkeyPatch) -> Any:
    cpu_bf16_speedup.cache_clear()
    yield monkeypatch
    cpu_bf16_speedup.cache_clear()


@pytest.mark.parametrize(("speedup", "expected"), [("2.5", "bf16-mixed"), ("1.05", "32-true")])
def test_cpu_bf16_is_used_when_measured_faster(fresh_speedup: Any, speedup: str, expected: str) -> None:
    fresh_speedup.setenv("KEEL_CPU_BF16_SPEEDUP", speedup)
    device = detect_device("cpu", measure_cpu_bf16=True)
    assert resolve_precision("auto", device).name == expected
    assert Trainer(_Wide(), loss_fn=lambda m, b: m(b).sum(), accelerator="cpu").precision.name == expected
    # too small to be worth bf16, or not "auto": not even measured
    assert not cpu_bf16_candidate("auto", make_net()) and not cpu_bf16_candidate("32", _Wide())
    assert Trainer(make_net(), loss_fn=mse, accelerator="cpu").precision.name == "32-true"


def test_cpu_bf16_measurement_is_cached_on_disk(fresh_speedup: Any) -> None:
    fresh_speedup.delenv("KEEL_CPU_BF16_SPEEDUP", raising=False)
    calls: list[int] = []
    fresh_speedup.setattr(precision_mod, "_time_bf16_speedup", lambda: calls.append(1) or 3.0)
    path = keel_home() / "cache" / "cpu_bf16.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")  # a torn file from elsewhere: measured again and rewritten
    assert cpu_bf16_speedup() == 3.0
    cpu_bf16_speedup.cache_clear()  # a new process: reads the file instead of measuring again
    assert cpu_bf16_speedup() == 3.0 and calls == [1]
    cache = json.loads(path.read_text())
    assert list(cache.values()) == [3.0]
    fresh_speedup.setenv("KEEL_CPU_BF16_SPEEDUP", "fast")
    cpu_bf16_speedup.cache_clear()
    with pytest.raises(ValueError, match="KEEL_CPU_BF16_SPEEDUP must be a number"):
        cpu_bf16_speedup()


def test_the_real_measurement_returns_a_ratio() -> None:
    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    ratio = precision_mod._time_bf16_speedup(repeats=1)
    assert ratio > 0 and math.isfinite(ratio)  # how much faster is machine-dependent: no threshold here
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched


@pytest.mark.cuda
def test_trainer_on_cuda_turns_everything_on(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 and TF32 need sm_80 or newer")
    net = _conv_net()
    meter = ThroughputMeter(warmup_steps=1, window_steps=None)
    trainer = Trainer(
        net, loss_fn=_xent(channels_last=True), max_steps=3, progress=False, log_every_n_steps=1, callbacks=[meter]
    )
    with caplog.at_level(logging.INFO, logger="core.training"):
        result = trainer.train(_images(12), batch_size=4)  # 3 steps in one epoch
    assert result.precision.name == "bf16-mixed" and "fused=True" in caplog.text
    assert all(result.config["speed"][name] for name in SPEED_SWITCHES)
    assert net._compiled_call_impl is not None and [w.steps for w in meter.windows] == [2]
