"""ChannelPruner: real architectures stay valid, and the pruned model computes what the original computes
with the removed channels zeroed (so the dependency graph removed the right inputs everywhere)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

from core.compression import ChannelPruner
from core.compression.pruning.graph import trace_channels

# A handful of fast ones; benchmarks/prune_coverage.py tries every torchvision classifier.
ARCHS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=5),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
    "efficientnet_lite0": lambda: timm.create_model("efficientnet_lite0", num_classes=5),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=5),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=5),
    "convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=5),
}
BN_ONLY = ("resnet18", "mobilenet_v3_small", "efficientnet_lite0", "regnet_x_400mf", "densenet121")


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _randomise_bn(model: nn.Module) -> None:
    """Random BN statistics, so a wrongly removed channel shows in the output."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@torch.no_grad()
def _zero_removed(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The original model with the pruned output channels of every conv / linear / BN set to zero."""
    zeroed = copy.deepcopy(model)
    modules = dict(zeroed.named_modules())
    for name, keep in masks.items():
        m = modules[name]
        drop = ~keep
        if isinstance(m, nn.BatchNorm2d):
            m.weight[drop] = 0
            m.bias[drop] = 0
        elif isinstance(m, nn.Conv2d | nn.Linear):
            m.weight[drop] = 0
            if m.bias is not None:
                m.bias[drop] = 0
    return zeroed


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_pruned_architecture_is_valid_and_exact(arch: str) -> None:
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    _randomise_bn(model)  # so that a wrongly removed channel shows in the output
    before = _params(model)
    x = torch.randn(2, 3, 32, 32)
    pruner = ChannelPruner(model, 0.5, "l1", example_input=x)
    pruned = pruner.prune().eval()
    assert _params(model) == before  # the original is untouched
    assert _params(pruned) < 0.6 * before
    assert 0.4 < pruner.pruned_fraction <= 0.5
    with torch.no_grad():
        out = pruned(x)
        assert out.shape == (2, 5)
        if arch in BN_ONLY:  # zeroing == removing holds exactly when no LayerNorm mixes the channels
            torch.testing.assert_close(out, _zero_removed(model, pruner.masks)(x), rtol=1e-4, atol=1e-4)
    pruned.train()(torch.randn(4, 3, 32, 32)).sum().backward()  # still trainable


class _Toy(nn.Module):
    """Concat, depthwise, grouped conv, a shared module, a layer-scale parameter, a residual add, a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 1, groups=4)
        self.shared = nn.Conv2d(16, 16, 1)
        self.gamma = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.head = nn.Linear(16 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x).relu(), self.b(x).relu()], dim=1)  # (B, 16, H, W)
        y = self.bn(self.dw(y)).relu()
        y = y + self.gamma * self.grouped(y)
        y = self.shared(self.shared(y).relu())
        y = nn.functional.adaptive_avg_pool2d(y, 4)
        return self.head(y.reshape(y.shape[0], -1))


def test_toy_graph_couplings_and_equivalence() -> None:
    torch.manual_seed(0)
    model = _Toy().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 8, 8)
    pruner = ChannelPruner(model, 0.5, "l1", example_input=x)
    pruned = pruner.prune().eval()
    assert pruned.grouped.groups < 4 and pruned.grouped.in_channels == pruned.dw.out_channels
    assert pruned.gamma.shape[0] == pruned.grouped.out_channels
    assert pruned.shared.in_channels == pruned.shared.out_channels  # called twice: one set of channels
    assert pruned.head.in_features == 16 * pruned.shared.out_channels
    with torch.no_grad():
        zeroed = _zero_removed(model, pruner.masks)
        zeroed.gamma[~pruner.masks["grouped"].view(-1, 1, 1).expand_as(zeroed.gamma)] = 0
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-4, atol=1e-4)


def test_what_the_tracer_does_not_follow_is_frozen() -> None:
    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            b, c, h, w = y.shape
            y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle
            return self.out(y)

    graph = trace_channels(Shuffle().eval(), torch.randn(1, 3, 4, 4))
    assert all(graph.uf.is_frozen(i) for i in graph.modules["conv"].out_ids or [])
    pruned = ChannelPruner(Shuffle(), 0.5, "l1", example_input=torch.randn(1, 3, 4, 4)).prune()
    assert pruned.conv.out_channels == 8  # left alone: never wrong


@pytest.mark.parametrize("metric", ["activation_magnitude", "taylor"])
def test_data_driven_metrics(metric: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))) for _ in range(2)]
    pruned = ChannelPruner(model, 0.3, metric, example_input=data[0][0], calibration_data=data).prune()
    assert pruned(data[0][0]).shape == (4, 3)
    assert _params(pruned) < _params(model)
    assert all(p.grad is None for p in model.parameters())


def test_activation_metric_drops_dead_channels() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # channels 0-3 are always dead after the ReLU...
        model[0].weight[:4] *= 10  # ...though their weights are the largest (L1 would keep them)
    x = torch.rand(4, 3, 4, 4)
    pruner = ChannelPruner(model, 0.5, "activation_magnitude", example_input=x, calibration_data=[x])
    pruner.prune()
    assert pruner.masks["0"].tolist() == [False] * 4 + [True] * 4


def test_round_to_keeps_multiples() -> None:
    model = torchvision.models.resnet18(num_classes=3).eval()
    pruned = ChannelPruner(model, 0.5, "l1", example_input=torch.randn(1, 3, 32, 32), round_to=8).prune()
    assert all(m.out_channels % 8 == 0 for m in pruned.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pruning_rate": 1.0}, "pruning_rate"),
        ({"metric": "random"}, "unknown pruning metric"),
        ({"metric": "taylor"}, "needs calibration_data"),
        ({"metric": "l1", "round_to": 0}, "round_to"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChannelPruner(nn.Linear(2, 2), example_input=torch.randn(1, 2), **kwargs)


def test_taylor_needs_labels() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="labelled batches"):
        ChannelPruner(
            model, 0.5, "taylor", example_input=torch.randn(2, 4), calibration_data=[torch.randn(2, 4)]
        ).prune()


class _TwoHeads(nn.Module):
    """A shared trunk with two heads, returned as a tuple and as a dict (detectors return several maps)."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.trunk = nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a, self.b = nn.Conv2d(16, 3, 1), nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        t = self.trunk(x)
        return {"a": self.a(t), "b": self.b(t)} if self.as_dict else (self.a(t), self.b(t))


@pytest.mark.parametrize("as_dict", [False, True])
def test_models_with_several_outputs_keep_every_output_shape(as_dict: bool) -> None:
    torch.manual_seed(0)
    model = _TwoHeads(as_dict).eval()
    x = torch.randn(2, 2, 8, 8)
    pruner = ChannelPruner(model, 0.5, "activation_magnitude", example_input=x, calibration_data=[x])
    pruned = pruner.prune()
    assert pruned.trunk[0].out_channels == 8 and pruned.a.in_channels == pruned.b.in_channels == 8
    with torch.no_grad():
        want, got = _zero_removed(model, pruner.masks)(x), pruned(x)
    pairs = [(want[k], got[k]) for k in ("a", "b")] if as_dict else list(zip(want, got, strict=True))
    for w, g in pairs:  # the heads' own channels are outputs: frozen, so every shape is unchanged
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
