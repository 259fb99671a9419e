"""Static int8 details behind issue #4: the int8 engine, Identity-free fusion, shape-independent results."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.compression.quantization import QUANT_BACKEND, convert_qat, prepare_qat, quantize_static, skip_identities

# The int8 kernels run on torch's quantized tensor types, which torch now announces it will retire.
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


class Block(nn.Module):
    """A timm-style bottleneck: an ``nn.Identity`` (drop-block slot) between BatchNorm and ReLU, residual add."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1, self.drop_block, self.act1 = (
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.Identity(),
            nn.ReLU(),
        )
        self.conv2, self.bn2, self.act2 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        return self.act2(self.bn2(self.conv2(y)) + x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(), Block(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    for m in net.modules():  # BatchNorm statistics that are not the identity, so folding them is tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _calib(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(scope="module")
def quantized() -> tuple[nn.Module, list[torch.Tensor], nn.Module]:
    """(float model, calibration batches, its static int8 model): torch's histogram observers take a while to
    pick their ranges, so the tests share one quantisation."""
    model, calib = _net(), _calib()
    return model, calib, quantize_static(model, calibration_data=calib, example_input=calib[0][:1])


def test_identity_between_bn_and_relu_no_longer_blocks_fusion(quantized: tuple) -> None:
    model, _, q = quantized
    kinds = [type(m).__name__ for m in q.modules()]
    assert kinds.count("ConvReLU2d") == 3  # stem + each block's conv1, the latter only once the Identity is gone
    assert "ReLU" not in kinds and "Identity" not in kinds
    targets = [str(n.target) for n in q.graph.nodes if n.op == "call_function"]
    assert targets.count("quantized.add_relu") == 2  # the residual add and its ReLU are one int8 op
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert _relative_error(q(x), model(x)) < 0.1


def test_skip_identities_keeps_the_function_and_the_parameter_names() -> None:
    model = _net()
    traced = skip_identities(model)
    assert not any(type(m) is nn.Identity for m in traced.modules())
    assert traced.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(traced(x), model(x))
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    assert skip_identities(plain) is plain  # nothing to bypass: not traced at all


def test_batch_results_do_not_depend_on_the_order_of_batch_sizes(quantized: tuple) -> None:
    """The shape a packed conv saw first must not change what it returns for another shape."""
    q = copy.deepcopy(quantized[2])  # re-packed: no shape seen yet
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        first = [q(x[i : i + 1]) for i in range(3)]
        batch = q(x)
        again = q(x[:1])
    torch.testing.assert_close(batch[:3], torch.cat(first), rtol=0, atol=0)
    torch.testing.assert_close(again, first[0], rtol=0, atol=0)


def test_engine_is_fbgemm_and_x86_gives_the_same_model(quantized: tuple) -> None:
    """Both engines share one qconfig, so only the kernels differ, and the process-wide engine is put back."""
    assert QUANT_BACKEND == "fbgemm"
    model, calib, q = quantized
    q86 = quantize_static(model, calibration_data=calib, example_input=calib[0][:1], engine="x86")
    assert torch.backends.quantized.engine == QUANT_BACKEND
    for (k, a), b in zip(q.state_dict().items(), q86.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.dequantize() if a.is_quantized else a, b.dequantize() if b.is_quantized else b), k
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    scale = float(q.get_submodule("3.conv1").scale)  # one int8 step of an early activation
    assert (q(x) - q86(x)).abs().max() < 4 * scale
    with pytest.raises(ValueError, match="quantisation engine 'tpu-int8' is not available here"):
        quantize_static(model, calibration_data=calib, example_input=calib[0][:1], engine="tpu-int8")
    assert torch.backends.quantized.engine == QUANT_BACKEND


def test_qat_and_a_reload_rebuild_the_static_structure(quantized: tuple) -> None:
    """What the registry does for static int8 and QAT versions: quantise a fresh copy on any input,
    then load the saved state; QAT must fuse exactly as static int8 does for that to fit."""
    model, calib, q = quantized
    fresh = quantize_static(model, calibration_data=calib[1:], example_input=calib[0][:1])  # other ranges
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)

    prepared = prepare_qat(model, example_input=calib[0][:1])
    kinds = [type(m).__name__ for m in prepared.modules()]
    assert kinds.count("ConvBnReLU2d") == 3 and "Identity" not in kinds
    with torch.no_grad():
        prepared(calib[0])
    qat = convert_qat(prepared)
    assert qat.state_dict().keys() == fresh.state_dict().keys()
    fresh.load_state_dict(qat.state_dict())
    torch.testing.assert_close(fresh(x), qat(x), rtol=0, atol=0)
