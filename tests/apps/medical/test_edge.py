"""Edge export of the medical model: the split is exact, every variant exports, calibrates and registers with
lineage, and a registered variant loads back to the same calibrated predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from sklearn.metrics import roc_auc_score

from apps.medical.data import load_split, synthetic_xrays
from apps.medical.edge import (
    EDGE_NAME,
    EdgeConfig,
    build_variants,
    load_edge_predictor,
    main,
    quantize_aware,
    split_net,
)
from apps.medical.model import MedicalPredictor, load_predictor
from apps.medical.train import MedicalTrainConfig, split_labelled
from core.registry import ModelRegistry


@pytest.fixture(scope="module")
def parent(trained_registry: Path) -> tuple[ModelRegistry, object, MedicalPredictor, MedicalTrainConfig]:
    registry = ModelRegistry(trained_registry)
    version, state = registry.load("medical@1")
    recipe = MedicalTrainConfig(**{**version.config["recipe"], "registry_root": None})
    return registry, version, load_predictor(version, state), recipe


def test_split_net_computes_the_same_logits(parent: tuple) -> None:
    _, _, predictor, _ = parent
    x = torch.from_numpy(synthetic_xrays(8, seed=3).images).float()[:, None] / 255
    net = predictor.nets[0]
    with torch.no_grad():
        torch.testing.assert_close(split_net(net)(x), net(x))


def test_variants_export_calibrate_and_register_with_lineage(parent: tuple, synthetic_npz: Path) -> None:
    registry, version, _, _ = parent
    rows = main(
        ["--model", "medical@1", "--registry", str(registry.root), "--variants", "fp32,onnx,int8_ptq,int8_ort"]
        + ["--data", str(synthetic_npz), "--split", "test"]
    )
    by_name = {r["variant"]: r for r in rows}
    assert set(by_name) == {"fp32", "onnx", "int8_ptq", "int8_ort"} and "registered" not in by_name["fp32"]
    assert by_name["onnx"]["auc"] == pytest.approx(by_name["fp32"]["auc"], abs=1e-3)  # the same function
    for name in ("onnx", "int8_ptq", "int8_ort"):
        assert by_name[name]["auc"] > 0.8, by_name[name]  # the toy X-rays stay separable
        v = registry.get(by_name[name]["registered"])
        assert v.name == EDGE_NAME and v.parent == version.ref and v.config["variant"] == name
        assert v.config["format"] == ("torchscript" if name == "int8_ptq" else "onnx")
    ort_version, ort_state = registry.load(by_name["int8_ort"]["registered"])
    onnx_size = registry.get(by_name["onnx"]["registered"]).metrics["size_bytes"]
    assert ort_version.metrics["size_bytes"] < 0.5 * onnx_size  # int8 weights in the file
    graph = onnx.load_model_from_string(ort_state["artifact"].numpy().tobytes()).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    weights = {i.name: i.data_type for i in graph.initializer}
    head = [name for name in weights if name.startswith("core.head.") and name.endswith(".weight")]
    assert head and all(weights[name] == onnx.TensorProto.FLOAT for name in head)  # the classifier stays fp32
    # a registered variant loads back and gives the calibrated probabilities it was scored with
    int8_version, state = registry.load(by_name["int8_ptq"]["registered"])
    loaded = load_edge_predictor(int8_version, state)
    cal = int8_version.config["calibration"]
    test = load_split(synthetic_npz, "test")
    z = loaded.logits(test.images)
    probs = loaded.calibrated(z)
    torch.testing.assert_close(probs, torch.sigmoid(z / cal["temperature"] + cal["bias"]))
    assert cal["temperature"] != 1.0  # refitted on the variant's own logits


def test_pruning_shrinks_and_calibration_applies(parent: tuple, tmp_path: Path) -> None:
    _, version, predictor, recipe = parent
    cfg = EdgeConfig(variants=("fp32", "pruned"), prune_rate=0.3, finetune_epochs=3, finetune_lr=1e-3)
    fp32, pruned = build_variants(predictor, recipe, cfg, tmp_path, source=version.ref)
    n_params = [sum(p.numel() for p in v.eager.parameters()) for v in (fp32, pruned)]
    assert n_params[1] < 0.7 * n_params[0]
    assert pruned.path is not None and pruned.path.suffix == ".onnx"
    assert pruned.export is not None and pruned.export["max_tol_ratio"] <= 1
    _, _, held = split_labelled(load_split(recipe.data_path, recipe.split), recipe)
    z = pruned.predictor.logits(held.images)
    assert roc_auc_score(held.labels, z.numpy()) > 0.8  # fine-tuning after pruning kept it working
    # the temperature minimises the held-out NLL of the variant's own logits (with few held-out images the bias
    # stays at the training prior's log-odds): no nearby temperature does better
    nll = torch.nn.functional.binary_cross_entropy_with_logits
    y = torch.from_numpy(held.labels).double()
    t, b = pruned.predictor.temperature, pruned.predictor.bias
    prior = pruned.predictor.train_prior
    assert len(held) < recipe.min_holdout_for_bias and b == pytest.approx(np.log(prior / (1 - prior)))
    best = nll(z.double() / t + b, y)
    for dt in (1.2, 0.8):
        assert best <= nll(z.double() / (t * dt) + b, y) + 1e-6


def test_quantisation_aware_training_gives_an_int8_model(parent: tuple) -> None:
    _, _, predictor, recipe = parent
    _, fit, _ = split_labelled(load_split(recipe.data_path, recipe.split), recipe)
    edge = quantize_aware(split_net(predictor.nets[0]), fit, recipe, EdgeConfig(qat_epochs=1))
    kinds = {type(m).__module__ for m in edge.core.modules()}
    assert any("quantized" in k for k in kinds), kinds
    test = synthetic_xrays(40, seed=5)
    with torch.no_grad():
        z = edge(torch.from_numpy(test.images).float()[:, None] / 255).numpy()
    assert z[test.labels == 1].mean() > z[test.labels == 0].mean()


def test_bad_requests_are_refused(parent: tuple, tmp_path: Path) -> None:
    _, version, predictor, recipe = parent
    with pytest.raises(ValueError, match="unknown edge variant"):
        build_variants(predictor, recipe, EdgeConfig(variants=("fp32", "int4")), tmp_path, source=version.ref)
    ensemble = MedicalPredictor(predictor.nets * 2)
    with pytest.raises(ValueError, match="ensemble of 2"):
        build_variants(ensemble, recipe, EdgeConfig(variants=("fp32",)), tmp_path, source=version.ref)
    with pytest.raises(ValueError, match="not a medical edge export"):
        load_edge_predictor(version, {})
    assert np.isfinite(predictor.temperature)
