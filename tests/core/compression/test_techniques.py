"""The other seven techniques and the shared report, on tiny models and synthetic data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.compression import (
    TECHNIQUES,
    LowRankSettings,
    cast_weights,
    cluster_weights,
    compress,
    distill,
    factorize,
    magnitude_prune,
    prune_gradually,
    quantize_dynamic,
    quantize_static,
    train_qat,
)
from core.compression.pruning import cubic_sparsity, magnitude_masks
from core.compression.quantization import static_same_padding

# The int8 kernels run on torch's quantized tensor types, which torch now announces it will retire.
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


def _cnn(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, classes),
    ).eval()  # fmt: skip


def _data(n: int = 64, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()  # learnable: the mean tells the class
    return TensorDataset(x, y)


def _batches(ds: TensorDataset, bs: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ds.tensors[0][i : i + bs], ds.tensors[1][i : i + bs]) for i in range(0, len(ds), bs)]


def test_registry_holds_the_eight_techniques() -> None:
    assert set(TECHNIQUES.names()) == {
        "channel_pruning", "magnitude_pruning", "dynamic_int8", "static_int8", "qat", "distillation", "low_rank",
        "fp16", "bf16", "weight_clustering", "transformer_pruning",
    }  # fmt: skip
    with pytest.raises(KeyError, match="unknown compression technique 'nope'; known: bf16"):
        TECHNIQUES.get("nope")


def test_compress_reports_before_and_after() -> None:
    model, val = _cnn(), _batches(_data())
    small, report = compress(
        model, "channel_pruning", example_input=val[0][0][:1], val_data=val, pruning_rate=0.5, batch_sizes=(1, 4)
    )
    assert report.after.params < report.before.params
    assert report.after.size_bytes < report.before.size_bytes
    assert set(report.after.latency_ms) == {1, 4} and all(v > 0 for v in report.after.latency_ms.values())
    assert report.metric_change is not None and report.before.metric is not None
    assert report.to_dict()["settings"] == {"pruning_rate": 0.5}
    assert "channel_pruning: params" in report.summary()
    with pytest.raises(ValueError, match="unexpected keyword argument 'rate'"):
        compress(model, "channel_pruning", example_input=val[0][0][:1], rate=0.5)
    with pytest.raises(ValueError, match="static_int8' needs calibration_data"):
        compress(model, "static_int8", example_input=val[0][0][:1])


def test_magnitude_pruning_is_global_and_exact() -> None:
    model = _cnn()
    pruned = magnitude_prune(model, 0.7)
    weights = [m.weight for m in pruned.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.7 * total, abs=2)
    # global: layers do not all lose the same fraction
    fractions = [float((w == 0).float().mean()) for w in weights]
    assert max(fractions) - min(fractions) > 0.05
    assert all(float((m.weight == 0).float().mean()) == 0 for m in model.modules() if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_masks(model, 1.0)


def test_cubic_schedule() -> None:
    kw = {"final": 0.8, "start_step": 10, "end_step": 110}
    assert cubic_sparsity(5, **kw) == 0.0
    assert cubic_sparsity(10, **kw) == 0.0
    assert cubic_sparsity(60, **kw) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(500, **kw) == pytest.approx(0.8)


def test_gradual_pruning_through_the_trainer() -> None:
    pruned = prune_gradually(_cnn(), _data(), sparsity=0.6, epochs=2, batch_size=16, frequency=1, log_every_n_steps=1)
    weights = torch.cat([m.weight.flatten() for m in pruned.modules() if isinstance(m, nn.Conv2d | nn.Linear)])
    assert float((weights == 0).float().mean()) == pytest.approx(0.6, abs=0.01)


def test_dynamic_int8_swaps_linear_lstm_gru() -> None:
    model = nn.ModuleDict({"lin": nn.Linear(8, 4), "lstm": nn.LSTM(8, 8), "gru": nn.GRU(8, 8)})
    q = quantize_dynamic(model)
    assert {m._get_name() for m in q.children()} == {
        "DynamicQuantizedLinear",
        "DynamicQuantizedLSTM",
        "DynamicQuantizedGRU",
    }
    x = torch.randn(5, 2, 8)
    torch.testing.assert_close(q["lin"](x), model["lin"](x), atol=0.05, rtol=0.05)
    assert type(model["lin"]) is nn.Linear  # the original is untouched


def test_static_int8_quantises_convs_and_stays_close() -> None:
    model, data = _cnn(), _batches(_data())
    q = quantize_static(model, calibration_data=data, example_input=data[0][0])
    kinds = {m._get_name() for m in q.modules()}
    assert "QuantizedConvReLU2d" in kinds and "QuantizedLinearReLU" in kinds  # conv + BN + ReLU fused and run in int8
    x = data[0][0]
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max()) + 0.05
    with pytest.raises(ValueError, match="no batches"):
        quantize_static(model, calibration_data=[], example_input=x)


def test_tf_same_padding_becomes_static_and_exact() -> None:
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.ReLU(), Conv2dSame(4, 4, 5, stride=2)).eval()
    x = torch.randn(2, 3, 15, 12)
    static = static_same_padding(copy.deepcopy(model), x)
    assert not any(type(m).__name__ == "Conv2dSame" for m in static.modules())
    torch.testing.assert_close(static(x), model(x))
    assert quantize_static(model, calibration_data=[x], example_input=x)(x).shape == model(x).shape


def test_qat_trains_through_the_trainer_and_converts() -> None:
    ds = _data()
    q = train_qat(_cnn(), ds, example_input=ds.tensors[0][:2], epochs=1, batch_size=16, lr=1e-3, log_every_n_steps=1)
    assert any(m._get_name() == "QuantizedConvReLU2d" for m in q.modules())
    assert q(ds.tensors[0][:4]).shape == (4, 3)


def test_distillation_logits_and_features() -> None:
    ds = _data()
    teacher = _cnn()
    student = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    )
    before = [p.detach().clone() for p in student.parameters()]
    out = distill(
        student,
        teacher,
        ds,
        example_input=ds.tensors[0][:2],
        feature_pairs={"1": "5"},
        epochs=1,
        batch_size=16,
        log_every_n_steps=1,
    )
    assert out is student
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert not student[1]._forward_hooks  # the feature hook is gone from the student
    with pytest.raises(ValueError, match="no module named 'missing'"):
        distill(student, teacher, ds, example_input=ds.tensors[0][:2], feature_pairs={"missing": "5"})


def test_low_rank_is_exact_at_full_energy_and_smaller_when_truncated() -> None:
    torch.manual_seed(0)
    u, v = torch.randn(96, 8), torch.randn(8, 128)
    lin = nn.Linear(128, 96)
    lin.weight.data = u @ v  # rank 8
    model = nn.Sequential(lin, nn.ReLU(), nn.Conv2d(1, 1, 1))
    small = factorize(model, LowRankSettings(energy=0.999999))
    assert isinstance(small[0], nn.Sequential) and small[0][0].out_features == 8
    x = torch.randn(4, 128)
    torch.testing.assert_close(small[0](x), lin(x), atol=1e-3, rtol=1e-3)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    f = factorize(nn.Sequential(conv), LowRankSettings(energy=0.5))
    assert sum(p.numel() for p in f.parameters()) < sum(p.numel() for p in conv.parameters())
    assert f(torch.randn(1, 64, 6, 6)).shape == (1, 64, 6, 6)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cast_halves_the_size_and_keeps_fp32_io(dtype: str) -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    result = compress(model, dtype, example_input=torch.randn(2, 64), batch_sizes=())
    assert result.report.after.size_bytes < 0.6 * result.report.before.size_bytes
    out = result.model(torch.randn(2, 64))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        cast_weights(model, "int4")


def test_clustering_leaves_n_values_per_layer_and_compresses() -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 3))
    result = compress(model, "weight_clustering", example_input=torch.randn(1, 256), n_clusters=16, batch_sizes=())
    assert result.model[0].weight.unique().numel() <= 16
    assert result.model[1].weight.unique().numel() > 16  # below min_numel: left alone
    assert result.report.after.size_zlib_bytes < 0.7 * result.report.before.size_zlib_bytes
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_weights(model, 1)
