"""Exported tiny encoders shared by the lite tests (exported once per session: an ONNX export takes seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.compression.export import ExportReport, export_onnx, export_torchscript
from tests.core.lite.models import TinyEncoder, random_tokens


def _encoder(per_token: bool) -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder(per_token=per_token).eval()


def _export(fmt: str, folder: Path, *, per_token: bool) -> tuple[TinyEncoder, ExportReport]:
    model = _encoder(per_token)
    fn = export_onnx if fmt == "onnx" else export_torchscript
    report = fn(
        model,
        random_tokens(2, 9, pad_from=4),
        folder / f"encoder{'_tok' if per_token else ''}.{'onnx' if fmt == 'onnx' else 'pt'}",
        input_names=["tokens"],
        output_names=["logits"],
        dynamic_axes={"tokens": {0: "batch", 1: "seq"}},
        check_inputs=[random_tokens(5, 30, seed=1, pad_from=2)],
    )
    return model, report


@pytest.fixture(scope="session")
def onnx_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyEncoder, ExportReport]:
    """A pooled-logits encoder exported to ONNX: ``tokens`` (B, T) int64 -> ``logits`` (B, 3)."""
    return _export("onnx", tmp_path_factory.mktemp("onnx"), per_token=False)


@pytest.fixture(scope="session")
def ts_token_encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyEncoder, ExportReport]:
    """A per-token encoder traced to TorchScript: ``tokens`` (B, T) int64 -> ``logits`` (B, T, 3)."""
    return _export("torchscript", tmp_path_factory.mktemp("ts"), per_token=True)
