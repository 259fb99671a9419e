"""Export a PyTorch model to ONNX or TorchScript, check it against PyTorch, and register it with lineage.

Every export is verified before it is returned: the written file is loaded in the runtime that will serve it
(:class:`core.lite.LiteModel`: ONNX Runtime on CPU, or the TorchScript interpreter) and its outputs are compared
with the PyTorch model's on the example and on every ``check_inputs`` batch (give some with other batch sizes and
sequence lengths to prove the dynamic axes); the largest difference is in the report, and a difference beyond
``atol + rtol * |torch|`` raises :class:`ExportParityError`.

    report = export_onnx(
        model, (tokens,), "encoder.onnx",
        input_names=["tokens"], output_names=["logits"],
        dynamic_axes={"tokens": {0: "batch", 1: "seq"}},
        check_inputs=[(tokens_b1_t7,), (tokens_b9_t300,)],
    )
    version = register_export(registry, report, name="encoder-onnx", parent="encoder@3")

ONNX goes through the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, which needs
``onnxscript``); TorchScript through ``torch.jit.trace`` (default) or ``torch.jit.script`` (data-dependent control
flow). PyTorch marks TorchScript as deprecated; it is still the one format its C++ runtime loads without Python.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.lite.artifact import (
    META_KEY,
    TS_META_FILE,
    ExportMeta,
    architecture_for,
    artifact_state,
    quiet_torchscript_deprecation,
)
from core.lite.runtime import LiteModel
from core.registry import ModelRegistry, ModelVersion

__all__ = ["ExportParityError", "ExportReport", "export_onnx", "export_torchscript", "quantize_onnx", "register_export"]

log = logging.getLogger(__name__)

Args = tuple[torch.Tensor, ...]
DynamicAxes = Mapping[str, Mapping[int, str]]


class ExportParityError(RuntimeError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely it matches PyTorch.

    Attributes:
        format: ``"onnx"`` or ``"torchscript"``.
        path: the written file.
        size_bytes: its size on disk.
        seconds: wall time of export + check.
        max_abs_diff: largest ``|exported - torch|`` over all outputs of all checked batches.
        max_tol_ratio: largest ``|exported - torch| / (atol + rtol * |torch|)``; <= 1 passed.
        atol, rtol: the tolerance used.
        checked_shapes: input shapes of every checked batch.
        meta: input / output names, dtypes and dynamic axes (also stored inside the file).
        notes: what the exporter warned about (e.g. TorchScript tracer warnings: values frozen into the trace).
    """

    format: str
    path: Path
    size_bytes: int
    seconds: float
    max_abs_diff: float
    max_tol_ratio: float
    atol: float
    rtol: float
    checked_shapes: list[list[list[int]]]
    meta: ExportMeta
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path), "meta": self.meta.to_dict()}


def export_onnx(
    model: nn.Module,
    example_inputs: Args | torch.Tensor,
    path: Path | str,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: DynamicAxes | None = None,
    check_inputs: Sequence[Args | torch.Tensor] = (),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    opset: int | None = None,
    source: str = "",
) -> ExportReport:
    """Exports ``model`` (in eval mode) to an ONNX file and checks it with ONNX Runtime.

    Args:
        model: the module; exported in eval mode (its training flag is restored afterwards).
        example_inputs: the positional inputs of one forward call.
        path: where to write (``.onnx``).
        input_names: one name per positional input.
        output_names: one name per output (a returned tuple is flattened).
        dynamic_axes: per input name, ``{axis: symbolic name}``; axes that share a name share a size (``"batch"``).
            A dynamic axis needs an example size of at least 2 (sizes 0 and 1 get specialised by torch.export).
        check_inputs: more input batches to compare on (e.g. other batch sizes and lengths).
        atol, rtol: tolerance of the comparison with PyTorch.
        opset: ONNX opset (default: the exporter's).
        source: what was exported, kept in the file's metadata (e.g. a registry ref).

    Raises:
        ValueError: names or dynamic axes that do not match the inputs.
        ExportParityError: ONNX Runtime disagrees with PyTorch beyond the tolerance.
    """
    args = _as_args(example_inputs)
    meta = _meta(model, args, input_names, output_names, dynamic_axes, source)
    shapes = tuple(
        {int(axis): name for axis, name in meta.dynamic_axes.get(n, {}).items()} or None for n in meta.inputs
    )
    start = time.perf_counter()
    with _eval_mode(model), warnings.catch_warnings():
        _ignore_exporter_noise()
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=shapes if any(s is not None for s in shapes) else None,
            opset_version=opset,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    _check_unique_names(proto, [*input_names, *output_names])
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta.to_dict())
    blob = proto.SerializeToString()
    return _write_and_check("onnx", blob, model=model, batches=[args, *check_inputs], path=Path(path), meta=meta,
                            atol=atol, rtol=rtol, start=start)  # fmt: skip


def export_torchscript(
    model: nn.Module,
    example_inputs: Args | torch.Tensor,
    path: Path | str,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    method: str = "trace",
    dynamic_axes: DynamicAxes | None = None,
    check_inputs: Sequence[Args | torch.Tensor] = (),
    atol: float = 1e-5,
    rtol: float = 1e-4,
    source: str = "",
) -> ExportReport:
    """Exports ``model`` (in eval mode) to a TorchScript archive and checks it against eager PyTorch.

    Args:
        method: ``"trace"`` (records one run: shapes stay dynamic, Python control flow is frozen to the example's
            branch) or ``"script"`` (compiles the code, keeps control flow; not every module scripts).
        dynamic_axes: recorded in the metadata for runtimes and readers (a trace keeps sizes symbolic anyway);
            ``check_inputs`` with other sizes is what proves it.
        Other arguments as in :func:`export_onnx`.

    Raises:
        ValueError: an unknown ``method``, or names that do not match the inputs.
        ExportParityError: the TorchScript module disagrees with eager PyTorch beyond the tolerance (a trace that
            froze a branch the check inputs do not take shows up here).
    """
    if method not in ("trace", "script"):
        raise ValueError(f"method must be 'trace' or 'script', got {method!r}")
    args = _as_args(example_inputs)
    meta = _meta(model, args, input_names, output_names, dynamic_axes, source)
    start = time.perf_counter()
    with _eval_mode(model), quiet_torchscript_deprecation(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)  # recorded into the report, not raised
        # check_trace re-runs the trace and compares graphs; it fails on modules with fast paths (nn.Transformer).
        # The output comparison below is the check that matters.
        trace = method == "trace"
        compiled = torch.jit.trace(model, args, check_trace=False) if trace else torch.jit.script(model)
        buffer = io.BytesIO()
        torch.jit.save(compiled, buffer, _extra_files={TS_META_FILE: json.dumps(meta.to_dict())})
    notes = _tracer_notes(caught)
    try:
        report = _write_and_check("torchscript", buffer.getvalue(), model=model, batches=[args, *check_inputs],
                                  path=Path(path), meta=meta, atol=atol, rtol=rtol, start=start)  # fmt: skip
    except ExportParityError as err:
        if not notes:
            raise
        raise ExportParityError(f"{err}; the tracer warned: {' | '.join(notes)}; try method='script'") from None
    return replace(report, notes=notes)


def register_export(
    registry: ModelRegistry,
    report: ExportReport,
    *,
    name: str,
    parent: str | None = None,
    aliases: Sequence[str] = (),
    metrics: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Registers an exported file as the next version of ``name``, its lineage pointing at ``parent``.

    The file's bytes become the version's (hash-checked) artifact, so :meth:`core.lite.LiteModel.from_registry`
    and a :class:`core.serving.ModelHandle` with :func:`core.lite.sequence_loader` can serve it.

    Args:
        registry: where to register.
        report: what :func:`export_onnx` / :func:`export_torchscript` returned.
        name: model name of the export (e.g. ``"encoder-onnx"``).
        parent: ref of the PyTorch version it was exported from (resolved to an exact version; must exist).
        aliases: aliases to point at the new version.
        metrics: extra metrics to record; the parity check's figures are always recorded.
    """
    blob = report.path.read_bytes()
    parent_ref = registry.get(parent).ref if parent is not None else None
    return registry.register(
        name,
        artifact_state(report.format, blob),
        architecture=architecture_for(report.format),
        config={"format": report.format, "file": report.path.name, **report.meta.to_dict()},
        metrics={
            "export_max_abs_diff": report.max_abs_diff,
            "export_max_tol_ratio": report.max_tol_ratio,
            "size_bytes": len(blob),
            **dict(metrics or {}),
        },
        hparams={"atol": report.atol, "rtol": report.rtol},
        parent=parent_ref,
        aliases=aliases,
    )


def quantize_onnx(
    src: Path | str,
    dst: Path | str,
    *,
    calibration: Sequence[Mapping[str, np.ndarray]],
    keep_fp32: Sequence[str] = (),
    per_channel: bool = True,
) -> None:
    """ONNX Runtime static int8 (QDQ) of an fp32 ONNX export: int8 weights, uint8 activations.

    Activation ranges are the min / max seen on ``calibration`` (feeds: input name -> array). Ops that read one of
    the ``keep_fp32`` weights (initializer names, e.g. ``"head.weight"``) stay in fp32: layers whose output range
    matters more than their cost (a detector's output convolutions). Core's FX int8 models cannot be exported to
    ONNX, so this is the int8 path for a model served by ONNX Runtime (:class:`core.lite.LiteModel`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("quantize_onnx needs at least one calibration feed")

    class _Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else dict(item)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Symbolic shape inference gives up on dynamic spatial axes (and then leaves files in the working
        # directory); ONNX's own shape inference is enough for quantisation.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        keep = set(keep_fp32)
        excluded = [n.name for n in graph.node if keep.intersection(n.input)]
        found = {i for n in graph.node for i in n.input} & keep
        if found != keep:
            raise ValueError(f"keep_fp32 names no weight of the graph: {sorted(keep - found)}")
        quantize_static(
            str(pre),
            str(dst),
            _Feeds(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
        )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _tracer_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """Tracer warnings become report notes (logged once); any other recorded warning is re-issued."""
    notes: list[str] = []
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            if str(w.message) not in notes:
                notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for note in notes:
        log.warning("TorchScript trace: %s", note)
    return notes


# Warnings torch's own exporter triggers inside torch.export (RNN weights, its deprecated internals); nothing a
# caller can act on, and pytest's warnings-as-errors would turn them into failed exports.
_EXPORTER_NOISE = (
    (r"_check_is_size will be removed", FutureWarning),
    (r"The \.grad attribute of a Tensor that is not a leaf", UserWarning),
    (r"The tensor attributes .* were assigned during export", UserWarning),
)


def _ignore_exporter_noise() -> None:
    for message, category in _EXPORTER_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def _check_unique_names(proto: Any, names: Sequence[str]) -> None:
    # The exporter names graph values after the ops that make them; an output called like an op inside the model
    # (e.g. "embedding" after nn.Embedding) gets defined twice and ONNX Runtime refuses the whole file.
    defined = [v.name for v in (*proto.graph.input, *proto.graph.initializer)]
    defined += [out for node in proto.graph.node for out in node.output]
    clashes = sorted({n for n in names if defined.count(n) > 1})
    if clashes:
        raise ValueError(
            f"input/output names {clashes} clash with values of the same name inside the exported graph; "
            "choose other names (e.g. prefix them: 'user_embedding')"
        )


def _as_args(inputs: Args | torch.Tensor) -> Args:
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise ValueError(f"input {i} must be a torch.Tensor, got {type(a).__name__}")
    return args


def _meta(
    model: nn.Module,
    args: Args,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: DynamicAxes | None,
    source: str,
) -> ExportMeta:
    if len(input_names) != len(args) or len(set(input_names)) != len(input_names):
        raise ValueError(f"give one distinct name per input: {len(args)} inputs, names {list(input_names)}")
    if not output_names or len(set(output_names)) != len(output_names):
        raise ValueError(f"give one distinct name per output, got {list(output_names)}")
    axes: dict[str, dict[str, str]] = {}
    for name, spec in (dynamic_axes or {}).items():
        if name not in input_names:
            raise ValueError(f"dynamic_axes names input {name!r}; the inputs are {list(input_names)}")
        example = args[list(input_names).index(name)]
        for axis, label in spec.items():
            if not 0 <= axis < example.ndim:
                raise ValueError(f"input {name!r} has {example.ndim} dimensions; no axis {axis} to make dynamic")
            if example.shape[axis] < 2:
                raise ValueError(
                    f"dynamic axis {axis} ({label!r}) of input {name!r} has size {example.shape[axis]} in the "
                    "example; use an example of size >= 2 there (torch.export fixes sizes 0 and 1)"
                )
        axes[name] = {str(axis): str(label) for axis, label in spec.items()}
    return ExportMeta(
        inputs=list(input_names),
        outputs=list(output_names),
        input_dtypes={n: str(a.dtype).removeprefix("torch.") for n, a in zip(input_names, args, strict=True)},
        input_ranks={n: a.ndim for n, a in zip(input_names, args, strict=True)},
        dynamic_axes=axes,
        source=source or type(model).__name__,
    )


def _write_and_check(
    fmt: str,
    blob: bytes,
    *,
    model: nn.Module,
    batches: Sequence[Args | torch.Tensor],
    path: Path,
    meta: ExportMeta,
    atol: float,
    rtol: float,
    start: float,
) -> ExportReport:
    """Runs ``blob`` in the lite runtime on every batch, compares with ``model``, writes it only if all agree."""
    lite = LiteModel.from_bytes(blob, fmt=fmt)
    worst_abs, worst_ratio, shapes = 0.0, 0.0, []
    with _eval_mode(model):
        for i, batch in enumerate(_as_args(b) for b in batches):
            with torch.inference_mode():
                expected = _flatten(model(*batch))
            if len(expected) != len(meta.outputs):
                raise ValueError(f"the model returns {len(expected)} outputs, named {meta.outputs}")
            got = lite.predict(list(batch))
            for name, want in zip(meta.outputs, expected, strict=True):
                diff, ratio = _compare(got[name], want, atol=atol, rtol=rtol, what=f"output {name!r} of batch {i}")
                worst_abs, worst_ratio = max(worst_abs, diff), max(worst_ratio, ratio)
                if ratio > 1:
                    raise ExportParityError(
                        f"{fmt} export disagrees with PyTorch on output {name!r} of check batch {i} "
                        f"(input shapes {[list(a.shape) for a in batch]}): max |diff| {diff:.3g} "
                        f"exceeds atol {atol:g} + rtol {rtol:g} * |torch|"
                    )
            shapes.append([list(a.shape) for a in batch])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    seconds = time.perf_counter() - start
    return ExportReport(fmt, path, len(blob), seconds, worst_abs, worst_ratio, atol, rtol, shapes, meta)


def _flatten(out: Any) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, tuple | list):
        return [a for o in out for a in _flatten(o)]
    raise ValueError(f"export needs the model to return tensors or tuples of tensors, got {type(out).__name__}")


def _compare(got: np.ndarray, want: np.ndarray, *, atol: float, rtol: float, what: str) -> tuple[float, float]:
    if got.shape != want.shape:
        raise ExportParityError(f"{what}: exported shape {got.shape}, PyTorch shape {want.shape}")
    if want.size == 0:
        return 0.0, 0.0
    g, w = got.astype(np.float64), want.astype(np.float64)
    both_nan = np.isnan(g) & np.isnan(w)
    diff = np.nan_to_num(np.where(both_nan, 0.0, np.abs(g - w)), nan=np.inf)  # NaN on one side only: a failure
    ratio = diff / (atol + rtol * np.nan_to_num(np.abs(w), nan=0.0))
    return float(diff.max()), float(ratio.max())
