"""How an exported model is stored: its file format, its metadata, and its place in the model registry.

An export is one self-describing file: an ONNX model (metadata in ``metadata_props["keel"]``) or a TorchScript
archive (metadata in the extra file ``keel.json``). In the registry the same bytes are one ``uint8`` tensor of the
version's state, so they are hashed, verified and loaded with ``weights_only=True`` like any other artifact, and the
version's ``parent`` points at the PyTorch model it was exported from.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMATS",
    "ExportMeta",
    "architecture_for",
    "artifact_from_state",
    "artifact_state",
    "format_of_path",
    "quiet_torchscript_deprecation",
]

# Format name -> file suffix. The names are also the runtime backends of :mod:`core.lite.runtime`.
FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt"}
_ARCH_PREFIX = "lite."
META_KEY = "keel"  # ONNX metadata_props key
TS_META_FILE = "keel.json"  # TorchScript extra file


@dataclass(frozen=True)
class ExportMeta:
    """What a runtime needs beyond the graph: names, dtypes and dynamic axes of the inputs and outputs.

    Attributes:
        inputs: input names in the order the model's ``forward`` takes them.
        outputs: output names in the order ``forward`` returns them (a tuple is flattened).
        input_dtypes: numpy dtype name of each input (``"int64"``, ``"float32"``).
        input_ranks: number of dimensions of each input.
        dynamic_axes: per input, axis index (as a string, JSON keys) -> symbolic name (``{"0": "batch"}``).
        source: free-form description of what was exported (class name, registry ref).
    """

    inputs: list[str]
    outputs: list[str]
    input_dtypes: dict[str, str]
    input_ranks: dict[str, int] = field(default_factory=dict)
    dynamic_axes: dict[str, dict[str, str]] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportMeta:
        try:
            return cls(
                inputs=list(data["inputs"]),
                outputs=list(data["outputs"]),
                input_dtypes=dict(data["input_dtypes"]),
                input_ranks={k: int(v) for k, v in dict(data.get("input_ranks", {})).items()},
                dynamic_axes={k: dict(v) for k, v in dict(data.get("dynamic_axes", {})).items()},
                source=str(data.get("source", "")),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"export metadata is missing or malformed ({err}); re-export the model") from None


def format_of_path(path: Path) -> str:
    """``"onnx"`` or ``"torchscript"`` from the suffix, else from the first bytes (a TorchScript archive is a zip)."""
    for fmt, suffix in FORMATS.items():
        if path.suffix == suffix:
            return fmt
    with path.open("rb") as f:
        head = f.read(2)
    return "torchscript" if head == b"PK" else "onnx"


def architecture_for(fmt: str) -> str:
    """The registry ``architecture`` of an export (``lite.onnx``)."""
    return _ARCH_PREFIX + fmt


def artifact_state(fmt: str, blob: bytes) -> dict[str, Any]:
    """The registry state holding an exported file's bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    return {"format": fmt, "artifact": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}


def artifact_from_state(state: Mapping[str, Any], *, ref: str = "this version") -> tuple[str, bytes]:
    """``(format, bytes)`` back from a registry state written by :func:`artifact_state`."""
    fmt, blob = state.get("format"), state.get("artifact")
    if fmt not in FORMATS or not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8:
        raise ValueError(
            f"{ref} is not an exported model (state keys: {sorted(state)}); export it first, "
            "e.g. with core.compression.export.export_onnx(...) and register_export(...)"
        )
    return str(fmt), blob.contiguous().numpy().tobytes()


@contextlib.contextmanager
def quiet_torchscript_deprecation() -> Iterator[None]:
    """Silences torch's "TorchScript is deprecated" FutureWarnings (and only those) around a deliberate use of it.

    TorchScript is one of the two export formats the spec asks for; the warning is announced once in the docs
    instead of on every call.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield
