"""A tiny train -> register -> load -> evaluate round trip on a synthetic ULB-format file (seconds)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from threadpoolctl import threadpool_limits

from apps.fraud.data import load_ulb, time_split, ulb_dense_features
from apps.fraud.evaluate import evaluate, fraud_metrics, recall_at_fpr
from apps.fraud.model import load_predictor
from apps.fraud.train import Arrays, FraudTrainConfig, _parse_args, batched_logits, main
from core.config import keel_home
from core.registry import ModelRegistry
from core.training.precision import detect_device, resolve_precision
from tests.utils.fraud import TINY, synthetic_ulb


@pytest.fixture(autouse=True, scope="module")
def _single_openmp_thread() -> Iterator[None]:
    # sklearn's gradient boosting spins OpenMP threads that starve each other on a busy 2-core box (5x slower).
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRegistry, str, Path, Path]:
    folder = tmp_path_factory.mktemp("fraud_train")
    dev = synthetic_ulb(folder / "dev.csv")
    later = folder / "later.csv"
    time_split(load_ulb(dev), 0.7)[1].to_csv(later, index=False)
    # Module-scoped, so KEEL_HOME is not yet isolated here: the checkpoints go to the test's folder explicitly.
    cfg = FraudTrainConfig(
        data_path=str(dev), registry_root=str(folder / "registry"), checkpoint_dir=str(folder / "ckpt"), **TINY
    )
    version = main(cfg)
    return ModelRegistry(folder / "registry"), version.ref, dev, later


def test_training_registers_a_production_model_with_its_data(trained: tuple) -> None:
    registry, ref, dev, _ = trained
    version = registry.get("fraud@production")
    assert version.ref == ref == "fraud@1"
    train_cfg = version.config["train"]
    assert train_cfg["data_path"] == str(dev.resolve()) and train_cfg["split"]["train_frac"] == 0.7
    assert train_cfg["data_fingerprint"].startswith("sha256:") and version.config["schema"] == "ulb"
    assert version.metrics["calib_fpr_at_threshold"] <= 0.003


def test_the_networks_train_through_the_keel_trainer(trained: tuple) -> None:
    registry, ref, _, _ = trained
    version = registry.get(ref)
    record, recipe = version.config["trainer"], version.config["recipe"]
    expected = resolve_precision("auto", detect_device())
    assert recipe["precision"] == "auto" and recipe["resume"] is False
    assert (record["precision"], record["precision_reason"]) == (expected.name, expected.reason)
    # One Trainer run per phase fits every member at once: one optimizer step per batch, not per member.
    n_train = version.config["train"]["split"]["n_train"]
    n_fit = int(n_train * (1 - TINY["calib_frac"]))
    steps = {phase: run["global_step"] for phase, run in record["runs"].items()}
    per_run = {
        p: TINY["epochs"] * math.ceil(n / TINY["batch_size"]) for p, n in [("calibration", n_fit), ("final", n_train)]
    }
    assert steps == per_run
    assert all(run["skipped_steps"] == 0 for run in record["runs"].values())
    assert (Path(record["checkpoint_dir"]) / "final" / "last.ckpt").is_file()
    assert len(registry.load(ref)[1]["members"]) == TINY["members"]


def test_resume_continues_from_the_checkpoints_of_the_same_recipe_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    dev = synthetic_ulb(tmp_path / "dev.csv", seed=2)
    cfg = FraudTrainConfig(data_path=str(dev), registry_root=str(tmp_path / "reg"), refit=False, **TINY)
    registry = ModelRegistry(tmp_path / "reg")
    first = main(cfg)
    last = keel_home() / "checkpoints" / "fraud" / "calibration" / "last.ckpt"
    assert last.is_file() and first.config["trainer"]["checkpoint_dir"] == str(last.parent.parent)
    caplog.clear()
    again = main(dataclasses.replace(cfg, resume=True, checkpoint_every_n_steps=7))  # run-only settings may change
    assert f"resuming from {last}" in caplog.text
    torch.testing.assert_close(registry.load(again.ref)[1]["members"], registry.load(first.ref)[1]["members"])
    caplog.clear()
    main(dataclasses.replace(cfg, resume=True, lr=1e-3))
    assert "another recipe or data: training from scratch" in caplog.text and "resuming from" not in caplog.text


def test_evaluate_follows_the_spec_contract(trained: tuple) -> None:
    registry, ref, _, later = trained
    result = evaluate("fraud@production", later, registry=registry)
    json.dumps(result)
    assert set(result) == {"app", "model", "data", "n", "metrics", "baseline"}
    assert result["app"] == "fraud" and result["model"] == ref and result["data"] == str(later)
    assert result["n"] == len(pd.read_csv(later))
    keys = {"roc_auc", "pr_auc", "recall_at_fpr_0_3pct"}
    assert set(result["metrics"]) == keys and set(result["baseline"]) == keys | {"name"}
    assert result["baseline"]["name"] == "hist_gbdt"
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    assert result["metrics"]["roc_auc"] > 0.9  # the synthetic frauds are easy; a broken pipeline is not


def test_calibrated_threshold_meets_the_fpr_on_the_calibration_slice(tmp_path: Path) -> None:
    dev = synthetic_ulb(tmp_path / "dev.csv", seed=1)
    cfg = FraudTrainConfig(data_path=str(dev), registry_root=str(tmp_path / "reg"), refit=False, **TINY)
    version, state = ModelRegistry(tmp_path / "reg").load(main(cfg).ref)
    predictor = load_predictor(version, state)
    train = time_split(load_ulb(dev), cfg.train_frac)[0]
    calib = train.iloc[int(len(train) * (1 - cfg.calib_frac)) :]
    out = predictor.predict_batch(calib.drop(columns=["Class"]).to_dict("records"))
    flagged = np.array([r["decision"] == "fraud" for r in out])
    legit = calib["Class"].to_numpy() == 0
    assert flagged[legit].mean() <= cfg.target_fpr
    logits = batched_logits(predictor, Arrays(ulb_dense_features(calib), calib["Class"].to_numpy()))
    probs = torch.sigmoid(predictor.platt[0] * torch.from_numpy(logits) + predictor.platt[1]).numpy()
    np.testing.assert_allclose(probs, [r["score"] for r in out], rtol=1e-5)


def test_evaluate_refuses_changed_training_data(trained: tuple, tmp_path: Path) -> None:
    registry, _, dev, later = trained
    version = registry.get("fraud@production")
    moved = tmp_path / "dev.csv"
    moved.write_bytes(dev.read_bytes().replace(b"\n", b"\r\n", 1))
    config = {**version.config, "train": {**version.config["train"], "data_path": str(moved)}}
    registry.register("fraud", registry.load(version.ref)[1], architecture=version.architecture, config=config)
    with pytest.raises(ValueError, match="changed since the model was trained"):
        evaluate("fraud@2", later, registry=registry)


def test_metrics_helpers() -> None:
    labels = np.array([0] * 1000 + [1] * 10)
    legit = np.linspace(0, 1, 1000)  # 0.3% of 1000: the top 3 legit rows may be flagged, the 4th (0.997) not
    assert recall_at_fpr(labels, np.concatenate([legit, np.linspace(0.9972, 2, 10)])) == 1.0
    scores = np.concatenate([legit, np.linspace(0.9968, 2, 10)])
    assert recall_at_fpr(labels, scores) == 0.9
    assert fraud_metrics(labels, scores)["roc_auc"] > 0.99
    with pytest.raises(ValueError, match="both classes"):
        fraud_metrics(np.zeros(5), np.arange(5.0))


def test_cli_arguments_map_to_the_config() -> None:
    cfg = _parse_args(["--train-frac", "0.8", "--refit", "false", "--source", "simulator", "--members", "3"])
    assert (cfg.train_frac, cfg.refit, cfg.source, cfg.members) == (0.8, False, "simulator", 3)
    assert dataclasses.replace(cfg, seed=2).seed == 2


def test_simulator_source_trains_a_sequence_model(tmp_path: Path) -> None:
    pytest.importorskip("apps.fraud.features")
    cfg = FraudTrainConfig(
        source="simulator",
        sim_customers=60,
        sim_terminals=120,
        sim_days=12,
        history=4,
        registry_root=str(tmp_path / "reg"),
        **{**TINY, "train_frac": 1.0},
    )
    version, state = ModelRegistry(tmp_path / "reg").load(main(cfg).ref)
    assert version.name == "fraud-card" and version.config["schema"] == "card"
    assert version.config["net"]["history"] == 4
    predictor = load_predictor(version, state)
    txns = [{"tx_id": i, "ts": 100.0 * i, "card_id": i % 3, "terminal_id": i % 5, "amount": 10.0 + i} for i in range(8)]
    out = predictor.predict_batch(txns)
    assert len(out) == 8 and all(r["decision"] in ("fraud", "legit") for r in out)
