"""Exports to ONNX and TorchScript: parity with PyTorch across architectures, dynamic axes, registry lineage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from core.compression.export import (
    ExportParityError,
    ExportReport,
    export_onnx,
    export_torchscript,
    quantize_onnx,
    register_export,
)
from core.lite import LiteModel
from core.registry import ModelRegistry, TamperedArtifactError
from tests.core.lite.models import TinyCNN, TinyEncoder, TinyRNN, random_tokens


@dataclass(frozen=True)
class Case:
    """One architecture: how to build it, an example batch, check batches of other shapes, names and dynamic axes."""

    build: Callable[[], nn.Module]
    example: torch.Tensor
    checks: list[torch.Tensor]
    outputs: list[str]
    axes: dict[int, str]


def _features(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, length, 4, generator=torch.Generator().manual_seed(seed))


CASES: dict[str, Case] = {
    "cnn": Case(
        TinyCNN,
        torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
        [torch.randn(5, 3, 16, 16), torch.randn(1, 3, 16, 16)],
        ["logits"],
        {0: "batch"},
    ),
    "transformer": Case(
        TinyEncoder,
        random_tokens(3, 12, pad_from=5),
        [random_tokens(1, 3, seed=1), random_tokens(7, 40, seed=2, pad_from=9), random_tokens(2, 64, seed=3)],
        ["logits"],
        {0: "batch", 1: "seq"},
    ),
    "gru": Case(
        lambda: TinyRNN("gru"), _features(2, 6, 0), [_features(5, 17, 1), _features(1, 2, 2)], ["last", "steps"], {}
    ),
    "lstm": Case(
        lambda: TinyRNN("lstm"), _features(2, 6, 0), [_features(5, 17, 1), _features(1, 2, 2)], ["last", "steps"], {}
    ),
}
for _rnn in ("gru", "lstm"):
    CASES[_rnn] = Case(**{**CASES[_rnn].__dict__, "axes": {0: "batch", 1: "time"}})


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name].build().eval()


def export(name: str, fmt: str, path: Path, **kwargs: Any) -> tuple[nn.Module, ExportReport]:
    case, model = CASES[name], build(name)
    fn = export_onnx if fmt == "onnx" else export_torchscript
    report = fn(
        model,
        (case.example,),
        path,
        input_names=["x"],
        output_names=case.outputs,
        dynamic_axes={"x": case.axes},
        check_inputs=[(c,) for c in case.checks],
        **kwargs,
    )
    return model, report


Exporter = Callable[..., tuple[nn.Module, ExportReport]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exporter:
    """``exported(name, fmt, **kwargs)``: each distinct export made once per module (an ONNX export takes seconds)."""
    cache: dict[tuple, tuple[nn.Module, ExportReport]] = {}
    folder = tmp_path_factory.mktemp("exports")

    def get(name: str, fmt: str, **kwargs: Any) -> tuple[nn.Module, ExportReport]:
        key = (name, fmt, *sorted(kwargs.items()))
        if key not in cache:
            suffix = ".onnx" if fmt == "onnx" else ".pt"
            cache[key] = export(name, fmt, folder / f"{name}-{len(cache)}{suffix}", **kwargs)
        return cache[key]

    return get


def assert_matches(model: nn.Module, lite: LiteModel, x: torch.Tensor, *, atol: float) -> None:
    with torch.inference_mode():
        out = model(x)
    expected = out if isinstance(out, tuple) else (out,)
    got = lite.predict(x)
    assert list(got) == lite.meta.outputs
    for want, have in zip(expected, got.values(), strict=True):
        np.testing.assert_allclose(have, want.numpy(), atol=atol, rtol=1e-3)


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_export_matches_pytorch_on_other_shapes(name: str, exported: Exporter) -> None:
    model, report = exported(name, "onnx")
    assert report.path.is_file() and report.size_bytes == report.path.stat().st_size
    assert report.max_tol_ratio <= 1 and report.max_abs_diff < 1e-3
    assert len(report.checked_shapes) == 1 + len(CASES[name].checks)  # the example and every check batch ran
    graph = onnx.load(report.path).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert [dims[a] for a in CASES[name].axes] == list(CASES[name].axes.values())
    lite = LiteModel.load(report.path, threads=1)
    assert lite.format == "onnx" and lite.meta.inputs == ["x"]
    assert_matches(model, lite, CASES[name].checks[0], atol=1e-4)


@pytest.mark.parametrize(("name", "method"), [("cnn", "trace"), ("transformer", "trace"), ("gru", "script")])
def test_torchscript_export_matches_pytorch(name: str, method: str, tmp_path: Path) -> None:
    model, report = export(name, "torchscript", tmp_path / f"{name}.pt", method=method)
    assert report.format == "torchscript" and report.max_tol_ratio <= 1
    lite = LiteModel.load(report.path)
    assert lite.format == "torchscript" and lite.meta.dynamic_axes == {
        "x": {str(a): n for a, n in CASES[name].axes.items()}
    }
    assert_matches(model, lite, CASES[name].checks[-1], atol=1e-5)


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x * 3


def test_trace_that_froze_a_branch_fails_the_parity_check(tmp_path: Path) -> None:
    path = tmp_path / "branchy.pt"
    with pytest.raises(ExportParityError, match="check batch 1 .*the tracer warned: .*boolean.*method='script'"):
        export_torchscript(Branchy(), torch.ones(2, 3), path, input_names=["x"], output_names=["y"],
                           check_inputs=[-torch.ones(2, 3)])  # fmt: skip
    assert not path.exists()  # nothing is written when the check fails
    report = export_torchscript(
        Branchy(), torch.ones(2, 3), path, input_names=["x"], output_names=["y"], method="script",
        check_inputs=[-torch.ones(2, 3)],
    )  # fmt: skip
    assert report.max_abs_diff == 0.0


def test_bad_export_arguments_are_named(tmp_path: Path) -> None:
    model, x = build("transformer"), random_tokens(1, 8)
    with pytest.raises(ValueError, match="axis 0 .*'batch'.* size 1"):
        export_onnx(
            model, x, tmp_path / "m.onnx", input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}}
        )
    with pytest.raises(ValueError, match="dynamic_axes names input 'tokens'"):
        export_onnx(
            model, x, tmp_path / "m.onnx", input_names=["x"], output_names=["y"], dynamic_axes={"tokens": {0: "b"}}
        )
    with pytest.raises(ValueError, match="one distinct name per input"):
        export_onnx(model, x, tmp_path / "m.onnx", input_names=["x", "y"], output_names=["y"])
    with pytest.raises(ValueError, match="method must be"):
        export_torchscript(model, x, tmp_path / "m.pt", input_names=["x"], output_names=["y"], method="compile")


def test_registered_export_keeps_lineage_and_serves_the_same_outputs(tmp_path: Path, exported: Exporter) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    model, report = exported("transformer", "onnx")
    parent = registry.register(
        "enc", model.state_dict(), architecture="tiny_encoder", config={}, aliases=["production"]
    )
    version = register_export(registry, report, name="enc-onnx", parent="enc@production", aliases=["production"])
    assert version.parent == parent.ref and version.architecture == "lite.onnx"
    assert version.config["format"] == "onnx" and version.config["inputs"] == ["x"]
    assert version.metrics["export_max_abs_diff"] == report.max_abs_diff
    lite = LiteModel.from_registry(registry, "enc-onnx@production")
    assert lite.version is not None and lite.version.ref == "enc-onnx@1"
    assert_matches(model, lite, random_tokens(4, 20, seed=5, pad_from=3), atol=1e-4)
    blob = bytearray(version.artifact_path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    version.artifact_path.write_bytes(bytes(blob))
    with pytest.raises(TamperedArtifactError):
        LiteModel.from_registry(registry, "enc-onnx@1")
    with pytest.raises(ValueError, match="enc@1 is not an exported model"):
        LiteModel.from_registry(registry, "enc@1")


def test_int8_onnx_tracks_fp32_and_keeps_named_weights_in_fp32(exported: Exporter, tmp_path: Path) -> None:
    import onnxruntime as ort

    model, report = exported("cnn", "onnx")
    gen = torch.Generator().manual_seed(5)
    feeds = [{"x": torch.randn(4, 3, 16, 16, generator=gen).numpy()} for _ in range(4)]
    dst = tmp_path / "int8.onnx"
    quantize_onnx(report.path, dst, calibration=feeds, keep_fp32=["stem.0.weight"])
    nodes = onnx.load(str(dst)).graph.node
    assert any(n.op_type == "DequantizeLinear" for n in nodes)  # something became int8 ...
    assert any(n.op_type == "Conv" and "stem.0.weight" in n.input for n in nodes)  # ... but not the kept conv
    x = feeds[0]["x"]
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max() + 0.05
    with pytest.raises(ValueError, match="no weight of the graph"):
        quantize_onnx(report.path, tmp_path / "bad.onnx", calibration=feeds, keep_fp32=["nope.weight"])
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(report.path, tmp_path / "bad.onnx", calibration=[])
