"""The edge export: parity with PyTorch, int8 variants in the same schema, registry lineage, and serving it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from apps.pcb_inspection.data import CLASSES, PcbDataset, read_list
from apps.pcb_inspection.edge import calibration_inputs, export_edge, load_source, main, prune_detector, quantize_onnx
from apps.pcb_inspection.evaluate import evaluate
from apps.pcb_inspection.model import LiteDetector, PcbPredictor, decode, load_predictor
from apps.pcb_inspection.service import PcbSettings, create_app
from core.lite import LiteModel
from core.registry import ModelRegistry
from core.serving import ServingSettings
from tests.apps.pcb_inspection.conftest import Trained


@dataclass(frozen=True)
class Edge:
    ref: str
    path: Path
    summary: dict


@pytest.fixture(scope="module")
def edge(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Edge:
    """The ONNX fp32 edge export of the trained tiny detector, made and registered by the CLI (the one ONNX export
    of this file: each takes tens of seconds; the int8 ONNX model is quantised from it)."""
    out = tmp_path_factory.mktemp("edge") / "pcb_fp32.onnx"
    argv = ["--model", trained.ref, "--out", str(out), "--list", str(trained.list_file), "--split", "none"]
    argv += ["--variant", "fp32"]
    argv += ["--calibration-pairs", "3", "--registry-root", str(trained.registry_root)]
    summary = main(argv)
    return Edge(summary["registered"], out, summary)


def _calibration(trained: Trained, n: int = 2) -> list[torch.Tensor]:
    return calibration_inputs(read_list(trained.list_file), n=n)


def _png(side: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random(side[::-1]) > 0.5).astype(np.uint8) * 255).save(buf, "PNG")
    return buf.getvalue()


def test_onnx_fp32_round_trip_matches_pytorch(edge: Edge, trained: Trained) -> None:
    export = edge.summary["export"]
    assert export["format"] == "onnx" and export["parity"]["max_tol_ratio"] <= 1
    assert [[2, 2, 32, 32]] in export["parity"]["checked_shapes"]  # batch 2, and other sizes below
    src = load_source(trained.ref, registry=ModelRegistry(trained.registry_root))
    lite = LiteDetector(LiteModel.load(edge.path), src.model.cfg)
    x = torch.randint(0, 2, (3, 2, 96, 64)).float() * 2 - 1  # a batch and a size the export never saw
    with torch.no_grad():
        want = src.model(x)
    for got, ref in zip(lite(x), want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)
    for a, b in zip(decode(lite(x), k=20), decode(want, k=20), strict=True):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        np.testing.assert_array_equal(a.classes, b.classes)


def _check_int8(trained: Trained, path: Path, score_diff: float) -> None:
    src = load_source(trained.ref, registry=ModelRegistry(trained.registry_root))
    assert score_diff < 0.1
    assert path.stat().st_size < 0.5 * sum(p.numel() * 4 for p in src.model.parameters())  # int8 weights
    predictor = PcbPredictor(LiteDetector(LiteModel.load(path), src.model.cfg), score_threshold=0.0)
    pair = PcbDataset(read_list(trained.list_file)).pair(0) * 255
    out = predictor.predict_batch([(pair[0], pair[1]), (pair[0], None)])
    assert len(out) == 2 and 1 <= len(out[0]) <= src.model.cfg.max_detections  # threshold 0: every peak NMS keeps
    for d in out[0] + out[1]:
        assert set(d) == {"box", "class", "score"} and d["class"] in CLASSES and 0 <= d["score"] <= 1
        assert len(d["box"]) == 4 and 0 <= d["box"][0] <= d["box"][2] <= 64


def test_onnxruntime_int8_returns_boxes_in_the_same_schema(edge: Edge, trained: Trained, tmp_path: Path) -> None:
    quantize_onnx(edge.path, tmp_path / "int8.onnx", calibration=_calibration(trained, 3))
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) > 10
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert {"heatmap.weight", "size.weight", "offset.weight"} <= floats  # the output convolutions stay fp32
    lite = LiteModel.load(tmp_path / "int8.onnx")
    src = load_source(trained.ref, registry=ModelRegistry(trained.registry_root))
    x = _calibration(trained)[0]
    with torch.no_grad():
        diff = (torch.from_numpy(lite.predict([x])["heatmap"]).sigmoid() - src.model(x)[0].sigmoid()).abs().max()
    _check_int8(trained, tmp_path / "int8.onnx", float(diff))


def test_fx_int8_torchscript_returns_boxes_in_the_same_schema(trained: Trained, tmp_path: Path) -> None:
    src = load_source(trained.ref, registry=ModelRegistry(trained.registry_root))
    export = export_edge(src.model, tmp_path / "m.pt", variant="int8-fx", calibration=_calibration(trained, 3))
    assert export.format == "torchscript" and export.parity.max_tol_ratio <= 1
    _check_int8(trained, export.path, export.score_max_abs_diff)


def test_export_refuses_a_wrong_suffix_and_no_calibration(trained: Trained, tmp_path: Path) -> None:
    src = load_source(trained.ref, registry=ModelRegistry(trained.registry_root))
    with pytest.raises(ValueError, match=r"int8-fx export is a \.pt file"):
        export_edge(src.model, tmp_path / "m.onnx", variant="int8-fx", calibration=_calibration(trained))
    with pytest.raises(ValueError, match="calibration"):
        export_edge(src.model, tmp_path / "m.onnx", variant="int8", calibration=[])


def test_cli_registers_with_lineage_and_the_export_loads_as_a_predictor(edge: Edge, trained: Trained) -> None:
    registry = ModelRegistry(trained.registry_root)
    mv, state = registry.load(edge.ref)
    assert mv.name == "pcb_inspection-edge" and mv.parent == registry.get(trained.ref).ref
    assert mv.architecture == "lite.onnx" and mv.config["variant"] == "fp32" and "production" in mv.aliases
    assert mv.metrics["export_max_tol_ratio"] <= 1 and mv.metrics["size_bytes"] == edge.path.stat().st_size
    predictor = load_predictor(mv, state, threads=1)
    assert isinstance(predictor.model, LiteDetector)
    assert predictor.score_threshold == registry.get(trained.ref).config["score_threshold"]


def test_keel_eval_scores_the_export(edge: Edge, trained: Trained) -> None:
    result = evaluate(edge.ref, data_dir=trained.list_file.parent, list_file=trained.list_file,
                      registry=ModelRegistry(trained.registry_root))  # fmt: skip
    assert result["model"] == edge.ref and result["n"] == 6
    assert set(result["metrics"]) >= {"map50", "map50_per_class", "f_score_iou033"}


def test_cli_prunes_fine_tunes_and_registers_the_smaller_export(
    trained: Trained, tmp_path: Path, same_pair_shares: list[float]
) -> None:
    out = tmp_path / "pruned.onnx"
    argv = ["--model", trained.ref, "--out", str(out), "--list", str(trained.list_file), "--split", "none"]
    argv += ["--variant", "fp32", "--prune", "0.5", "--finetune-s", "1", "--calibration-pairs", "2"]
    summary = main([*argv, "--registry-root", str(trained.registry_root), "--name", "pcb-pruned"])
    assert same_pair_shares == [0.25]  # the fine-tune keeps the detector comparing (same pairs, as in training)
    registry = ModelRegistry(trained.registry_root)
    mv, state = registry.load(summary["registered"])
    pruning = mv.config["pruning"]
    assert mv.parent == registry.get(trained.ref).ref and pruning["rate"] == 0.5
    assert pruning["params_after"] < 0.6 * pruning["params_before"]
    assert pruning["finetune"]["same_pair"] == 0.25
    assert pruning["finetune"]["steps"] >= 1 and summary["export"]["parity"]["max_tol_ratio"] <= 1
    src = load_source(trained.ref, registry=registry)
    stem = onnx.load(str(out)).graph.initializer
    widths = {t.name: t.dims[0] for t in stem if t.name.startswith("backbone.conv1.0")}
    assert widths and all(w < src.model.backbone.conv1[0].out_channels for w in widths.values())
    pair = _calibration(trained, 1)[0]
    heat, _, _ = load_predictor(mv, state, threads=1).model(pair)
    assert heat.shape == src.model(pair)[0].shape  # same heads, fewer channels inside


def test_prune_detector_refuses_useless_settings(trained: Trained) -> None:
    src = load_source(trained.ref, registry=ModelRegistry(trained.registry_root))
    records = read_list(trained.list_file)
    calibration = _calibration(trained, 1)
    with pytest.raises(ValueError, match="pruning rate"):
        prune_detector(src.model, records, rate=0.0, finetune_s=1, calibration=calibration)
    with pytest.raises(ValueError, match="useless untrained"):
        prune_detector(src.model, records, rate=0.5, finetune_s=0, calibration=calibration)
    with pytest.raises(ValueError, match="calibration"):
        prune_detector(src.model, records, rate=0.5, finetune_s=1, calibration=[])


def test_load_source_refuses_an_export_and_a_foreign_file(edge: Edge, trained: Trained, tmp_path: Path) -> None:
    registry = ModelRegistry(trained.registry_root)
    with pytest.raises(ValueError, match="already an export"):
        load_source(edge.ref, registry=registry)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pcb_gpu_model.pt"):
        load_source(str(tmp_path / "other.pt"), registry=registry)


@pytest.fixture
def edge_client(edge: Edge, trained: Trained) -> Iterator[TestClient]:
    settings = ServingSettings(registry_root=trained.registry_root, reload_interval_s=0)
    with TestClient(create_app(settings, PcbSettings(model_ref=edge.ref, lite_threads=1))) as c:
        yield c


def test_service_serves_the_edge_export(edge_client: TestClient, edge: Edge) -> None:
    r = edge_client.post("/v1/inspect", files={"test": ("t.png", _png()), "template": ("m.png", _png(seed=1))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == edge.ref and body["template_used"] and body["width"] == 64
    for d in body["defects"]:
        assert d["class"] in CLASSES and 0.3 <= d["score"] <= 1
    png = edge_client.post("/v1/inspect?render=png", files={"test": ("t.png", _png((96, 64)))})
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (96, 64)


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({"test": ("t.png", b"garbage")}, "test: not a readable image"),
        ({"test": ("t.png", _png()), "template": ("m.png", _png((96, 64)))}, "template: 96x64 px but test is 64x64"),
    ],
)
def test_edge_service_still_answers_422(edge_client: TestClient, files: dict, needle: str) -> None:
    r = edge_client.post("/v1/inspect", files=files)
    assert r.status_code == 422 and needle in r.text


def test_bad_lite_threads_setting_fails_fast() -> None:
    with pytest.raises(ValueError, match="lite_threads"):
        PcbSettings(lite_threads=0)
