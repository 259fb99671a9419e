"""LiteModel: one API over ONNX Runtime and TorchScript, clear errors for inputs that do not fit the export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from core.compression.export import ExportReport
from core.lite import LiteInputError, LiteModel, SequencePredictor, TokenBudgetPlanner
from core.utils.registry import UnknownNameError
from tests.core.lite.models import PAD, TinyEncoder, random_tokens

Exported = tuple[TinyEncoder, ExportReport]


def reference(model: TinyEncoder, seq: np.ndarray) -> np.ndarray:
    """The PyTorch output for one sequence run alone (no padding at all)."""
    with torch.inference_mode():
        return model(torch.from_numpy(seq)[None])[0].numpy()


def sequences(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(2.0, 0.9, n).astype(int) + 1, 60)
    return [rng.integers(1, 50, size=int(k)).astype(np.int64) for k in lengths]


def test_predict_accepts_names_positions_lists_and_safe_casts(onnx_encoder: Exported) -> None:
    model, report = onnx_encoder
    lite = LiteModel.load(report.path, threads=1)
    x = random_tokens(3, 11, seed=4, pad_from=6)
    with torch.inference_mode():
        want = model(x).numpy()
    for inputs in ({"tokens": x.numpy()}, x, x.numpy(), [x], x.tolist(), x.numpy().astype(np.int32)):
        np.testing.assert_allclose(lite.predict(inputs)["logits"], want, atol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"ids": np.ones((1, 3), dtype=np.int64)}, r"missing \['tokens'\], unknown \['ids'\]"),
        (np.ones((1, 3), dtype=np.float32), "input 'tokens' must be int64, got float32"),
        (np.ones(3, dtype=np.int64), r"must have 2 dimensions, got shape \(3,\)"),
        ([np.ones((1, 3), dtype=np.int64)] * 2, r"takes 1 inputs \['tokens'\], got 2"),
    ],
)
def test_inputs_that_do_not_fit_are_named(onnx_encoder: Exported, inputs: object, message: str) -> None:
    lite = LiteModel.load(onnx_encoder[1].path)
    with pytest.raises(LiteInputError, match=message):
        lite.predict(inputs)  # type: ignore[arg-type]


def test_loading_errors(tmp_path: Path, onnx_encoder: Exported) -> None:
    with pytest.raises(FileNotFoundError, match="no exported model"):
        LiteModel.load(tmp_path / "missing.onnx")
    with pytest.raises(UnknownNameError, match="unknown lite runtime backend 'tflite'; known: onnx, torchscript"):
        LiteModel.load(onnx_encoder[1].path, fmt="tflite")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        LiteModel.load(onnx_encoder[1].path, threads=0)


def test_onnx_file_without_keel_metadata_uses_the_graph_names(tmp_path: Path, onnx_encoder: Exported) -> None:
    proto = onnx.load(onnx_encoder[1].path)
    del proto.metadata_props[:]
    path = tmp_path / "plain.bin"  # no suffix: the format is sniffed from the bytes
    onnx.save(proto, path)
    lite = LiteModel.load(path)
    assert lite.format == "onnx" and lite.meta.inputs == ["tokens"] and lite.meta.outputs == ["logits"]
    assert lite.meta.input_dtypes == {"tokens": "int64"} and lite.meta.input_ranks == {"tokens": 2}


@pytest.mark.parametrize("fixture", ["onnx_encoder", "ts_token_encoder"])
def test_bucketed_batches_answer_every_request_with_its_own_result(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model, report = request.getfixturevalue(fixture)
    per_token = model.per_token
    predictor = SequencePredictor(LiteModel.load(report.path, threads=1), pad_value=PAD, pad_multiple=8,
                                  per_token=per_token)  # fmt: skip
    seen: list[tuple[int, ...]] = []
    run = predictor.model.predict

    def spy(inputs: dict) -> dict:
        seen.append(inputs["tokens"].shape)
        return run(inputs)

    predictor.model.predict = spy  # type: ignore[method-assign]
    seqs = sequences(40, seed=1)
    planner = TokenBudgetPlanner(max_tokens=128, pad_multiple=8)
    results = predictor.predict_many(seqs, plan=planner)
    assert len(results) == len(seqs) and len(seen) > 1
    for seq, got in zip(seqs, results, strict=True):  # order preserved, each result its own sequence's
        want = reference(model, seq)
        assert got.shape == want.shape == ((len(seq), 3) if per_token else (3,))
        np.testing.assert_allclose(got, want, atol=1e-4)
    for batch, width in seen:  # the token budget held on every call (no sequence here exceeds it alone)
        assert batch * width <= 128 and width % 8 == 0
    assert predictor.stats.calls == len(seen)
    assert predictor.stats.real_tokens == sum(len(s) for s in seqs)
    assert predictor.stats.padded_tokens == sum(b * w for b, w in seen) and 0 < predictor.stats.efficiency <= 1


def test_sequence_predictor_rejects_names_the_model_lacks(onnx_encoder: Exported) -> None:
    lite = LiteModel.load(onnx_encoder[1].path)
    with pytest.raises(ValueError, match="the model has no output 'probs'; its outputs: \\['logits'\\]"):
        SequencePredictor(lite, output_name="probs")
    with pytest.raises(ValueError, match="no input 'lengths'"):
        SequencePredictor(lite, lengths_input="lengths")


def test_measured_call_cost_is_in_tokens_and_leaves_the_counters_alone(onnx_encoder: Exported) -> None:
    predictor = SequencePredictor(LiteModel.load(onnx_encoder[1].path, threads=1), pad_multiple=8)
    cost = predictor.measure_call_cost(sequences(20, seed=2), batch_size=4, repeats=2)
    assert np.isfinite(cost) and cost >= 0
    assert predictor.stats.calls == 0 and predictor.stats.padded_tokens == 0
    with pytest.raises(ValueError, match="batch_size >= 2"):
        predictor.measure_call_cost(sequences(3, seed=2), batch_size=1)
