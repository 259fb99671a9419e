"""``LiteModel``: one API over the exported formats, run by ONNX Runtime (CPU) or the TorchScript interpreter.

    model = LiteModel.load("encoder.onnx", threads=1)                # a file written by core.compression.export
    model = LiteModel.from_registry(registry, "encoder-onnx@production")  # a hash-checked registry version
    out = model.predict({"tokens": ids})                              # -> {"logits": array}, by output name

Backends are looked up by format name in :data:`BACKENDS`, so a new runtime is one registered class.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from core.lite.artifact import (
    META_KEY,
    TS_META_FILE,
    ExportMeta,
    artifact_from_state,
    format_of_path,
    quiet_torchscript_deprecation,
)
from core.registry import ModelRegistry, ModelVersion
from core.utils.registry import Registry

__all__ = ["BACKENDS", "LiteBackend", "LiteInputError", "LiteModel"]

log = logging.getLogger(__name__)

Inputs = Mapping[str, Any] | np.ndarray | torch.Tensor | Sequence[Any]


class LiteInputError(ValueError):
    """Inputs that do not match the exported model (a missing or unknown name, a wrong dtype or rank)."""


class LiteBackend(Protocol):
    """One loaded model in one runtime."""

    meta: ExportMeta

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs the model on inputs already checked against ``meta``; returns the outputs in ``meta.outputs`` order."""
        ...


BackendFactory = Callable[[bytes, int | None], LiteBackend]
BACKENDS: Registry[BackendFactory] = Registry("lite runtime backend")


@BACKENDS.register("onnx")
class OnnxRuntimeBackend:
    """ONNX Runtime on CPU, all graph optimisations on, ``threads`` intra-op threads (``None``: ORT's default)."""

    def __init__(self, blob: bytes, threads: int | None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads is not None:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        custom = self.session.get_modelmeta().custom_metadata_map
        if META_KEY in custom:
            self.meta = ExportMeta.from_dict(json.loads(custom[META_KEY]))
        else:  # an ONNX file from elsewhere: names and dtypes come from the graph itself
            ins = self.session.get_inputs()
            self.meta = ExportMeta(
                inputs=[i.name for i in ins],
                outputs=[o.name for o in self.session.get_outputs()],
                input_dtypes={i.name: _ort_dtype(i.type) for i in ins},
                input_ranks={i.name: len(i.shape) for i in ins if i.shape is not None},
            )

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(self.meta.outputs, feeds))


@BACKENDS.register("torchscript")
class TorchScriptBackend:
    """The TorchScript interpreter; threads are torch's process-wide setting (``ModelHandle(torch_threads=...)``)."""

    def __init__(self, blob: bytes, threads: int | None) -> None:
        extra = {TS_META_FILE: ""}
        with quiet_torchscript_deprecation():
            self.module = torch.jit.load(io.BytesIO(blob), map_location="cpu", _extra_files=extra)
        self.module.eval()
        if not extra[TS_META_FILE]:
            raise ValueError(f"TorchScript archive has no {TS_META_FILE}: export it with core.compression.export")
        self.meta = ExportMeta.from_dict(json.loads(extra[TS_META_FILE]))
        if threads is not None:
            log.info("TorchScript backend: threads=%d ignored; torch threads are set process-wide", threads)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(feeds[name]) for name in self.meta.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        flat = list(out) if isinstance(out, tuple | list) else [out]
        return [t.detach().numpy() for t in flat]


def _ort_dtype(ort_type: str) -> str:
    # "tensor(int64)" -> "int64"; ORT names float32 "float" and float64 "double".
    inner = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64", "float16": "float16"}.get(inner, inner)


class LiteModel:
    """An exported model ready to run.

    Args:
        backend: the loaded runtime (see :data:`BACKENDS`).
        fmt: its format name.
        version: the registry entry it came from, when it came from the registry.
    """

    def __init__(self, backend: LiteBackend, *, fmt: str, version: ModelVersion | None = None) -> None:
        self.backend = backend
        self.format = fmt
        self.version = version

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_bytes(
        cls, blob: bytes, *, fmt: str, threads: int | None = None, version: ModelVersion | None = None
    ) -> LiteModel:
        """Loads exported bytes of format ``fmt`` (``"onnx"`` / ``"torchscript"``)."""
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        return cls(BACKENDS.get(fmt)(blob, threads), fmt=fmt, version=version)

    @classmethod
    def load(cls, path: Path | str, *, threads: int | None = None, fmt: str | None = None) -> LiteModel:
        """Loads an exported file; the format comes from the suffix (``.onnx`` / ``.pt``) or the file's first bytes."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no exported model at {path}")
        return cls.from_bytes(path.read_bytes(), fmt=fmt or format_of_path(path), threads=threads)

    @classmethod
    def from_state(cls, version: ModelVersion, state: Mapping[str, Any], *, threads: int | None = None) -> LiteModel:
        """From a registry entry and its verified state (the ``load`` hook of :class:`core.serving.ModelHandle`)."""
        fmt, blob = artifact_from_state(state, ref=version.ref)
        return cls.from_bytes(blob, fmt=fmt, threads=threads, version=version)

    @classmethod
    def from_registry(cls, registry: ModelRegistry, ref: str, *, threads: int | None = None) -> LiteModel:
        """Loads ``ref`` (``name``, ``name@3``, ``name@alias``) after the registry has checked its SHA-256."""
        version, state = registry.load(ref)
        return cls.from_state(version, state, threads=threads)

    # ------------------------------------------------------------------------------ running
    @property
    def meta(self) -> ExportMeta:
        """Input and output names, dtypes and dynamic axes of the export."""
        return self.backend.meta

    def predict(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """Runs the model.

        Args:
            inputs: a mapping by input name, or, positionally, one array (single-input models; nested lists too)
                or a list/tuple of arrays / tensors in :attr:`meta` ``.inputs`` order. Values are cast to the
                exported dtype when that keeps their meaning (int32 -> int64, float64 -> float32).

        Returns:
            The outputs by name, as numpy arrays.

        Raises:
            LiteInputError: an input is missing, unknown, of the wrong kind (float for int) or the wrong rank.
        """
        feeds = self._feeds(inputs)
        outputs = self.backend.run(feeds)
        return dict(zip(self.meta.outputs, outputs, strict=True))

    def _feeds(self, inputs: Inputs) -> dict[str, np.ndarray]:
        names = self.meta.inputs
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            unknown = [str(n) for n in inputs if n not in names]
            if missing or unknown:
                raise LiteInputError(
                    f"inputs must be exactly {names}; missing {missing or 'none'}, unknown {unknown or 'none'}"
                )
            given = dict(inputs)
        else:
            tensors = (np.ndarray, torch.Tensor)
            positional = not isinstance(inputs, tensors) and all(isinstance(a, tensors) for a in inputs)
            arrays = list(inputs) if positional else [inputs]  # else: one array, maybe as nested lists
            if len(arrays) != len(names):
                raise LiteInputError(f"the model takes {len(names)} inputs {names}, got {len(arrays)} positionally")
            given = dict(zip(names, arrays, strict=True))
        return {name: self._as_array(name, given[name]) for name in names}

    def _as_array(self, name: str, value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        want = np.dtype(self.meta.input_dtypes.get(name, array.dtype.name))
        if array.dtype != want:
            if array.dtype.kind not in _SAFE_KINDS.get(want.kind, ""):
                raise LiteInputError(f"input {name!r} must be {want.name}, got {array.dtype.name}")
            array = array.astype(want)
        rank = self.meta.input_ranks.get(name)
        if rank is not None and array.ndim != rank:
            raise LiteInputError(f"input {name!r} must have {rank} dimensions, got shape {tuple(array.shape)}")
        return np.ascontiguousarray(array)


# Which source dtype kinds may be cast to a target kind without losing meaning: ints to ints or floats,
# bools to anything numeric, floats only to floats.
_SAFE_KINDS = {"i": "iub", "u": "ub", "f": "fiub", "b": "b"}
