"""``keel eval fraud``: score a registered ULB model and the GBDT baseline on a CSV (SPEC section 5).

The baseline is scikit-learn's ``HistGradientBoostingClassifier`` with default parameters on the raw
columns (Time, V1..V28, Amount), trained on exactly the rows the model was trained on: the file, the
fingerprint and the time split are read back from the model's registry config.

Run::

    keel eval fraud --data later_part.csv [--model fraud@3]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import average_precision_score, roc_auc_score

from apps.fraud.data import ULB_FEATURES, ULB_LABEL, load_ulb, time_split, ulb_dense_features
from apps.fraud.model import load_predictor

__all__ = ["threshold_for_fpr", "fraud_metrics", "recall_at_fpr", "baseline_training_rows", "evaluate"]


def threshold_for_fpr(scores: np.ndarray, labels: np.ndarray, *, target_fpr: float) -> float:
    """Smallest threshold t such that the share of legitimate rows with ``score >= t`` is <= target_fpr."""
    legit = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 0])[::-1]
    if legit.size == 0:
        raise ValueError("threshold_for_fpr needs legitimate (label 0) rows")
    allowed = int(np.floor(target_fpr * legit.size))  # legit rows that may score at or above t
    if allowed >= legit.size:
        return float(legit[-1])
    # Just above the (allowed+1)-th highest legit score, so at most `allowed` legit rows reach t.
    return float(np.nextafter(legit[allowed], np.inf))


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, *, fpr: float = 0.003) -> float:
    """Recall at the lowest threshold whose false-positive rate (legit rows only) is at most ``fpr``."""
    labels = np.asarray(labels)
    threshold = threshold_for_fpr(scores, labels, target_fpr=fpr)
    return float((np.asarray(scores)[labels == 1] >= threshold).mean())


def fraud_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC-AUC, PR-AUC (average precision) and recall at 0.3% FPR of ``scores`` (higher = more fraud)."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise ValueError(f"metrics need both classes in Class; found only {int(labels[0])} in {len(labels)} rows")
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
        "recall_at_fpr_0_3pct": recall_at_fpr(labels, scores, fpr=0.003),
    }


def baseline_training_rows(train_cfg: dict[str, Any]) -> Any:
    """The ULB rows a model was trained on, from its registry config (checks the file's fingerprint)."""
    from core.registry import fingerprint_file

    path = Path(train_cfg["data_path"])
    if not path.is_file():
        raise FileNotFoundError(f"the model's training data {path} is gone; the baseline needs it")
    if fingerprint_file(path) != train_cfg["data_fingerprint"]:
        raise ValueError(f"{path} changed since the model was trained (fingerprint differs); retrain the model")
    frame = load_ulb(path)
    frac = float(train_cfg["split"]["train_frac"])
    return time_split(frame, frac)[0] if frac < 1.0 else frame


def evaluate(model_ref: str, data_csv: str | Path, *, registry: Any) -> dict[str, Any]:
    """Scores ``model_ref`` and the baseline on ``data_csv`` (ULB format, with Class).

    Args:
        model_ref: ``NAME@VERSION`` or ``NAME@ALIAS`` of a ULB-schema fraud model.
        data_csv: CSV with columns Time, V1..V28, Amount, Class.
        registry: the ``ModelRegistry`` holding the model.

    Returns:
        The SPEC section 5 object: app, model, data, n, metrics, baseline.
    """
    version, state = registry.load(model_ref)
    if version.config.get("schema") != "ulb":
        raise ValueError(f"{version.ref} is a {version.config.get('schema')!r} model; keel eval fraud needs 'ulb'")
    frame = load_ulb(data_csv)
    labels = frame[ULB_LABEL].to_numpy()
    predictor = load_predictor(version, state)
    dense = torch.from_numpy(ulb_dense_features(frame))
    logits = torch.cat([predictor.logits(part, None, None) for part in dense.split(4096)]).numpy()
    train = baseline_training_rows(version.config["train"])
    baseline = HistGradientBoostingClassifier(random_state=0)
    baseline.fit(train.loc[:, list(ULB_FEATURES)].to_numpy(), train[ULB_LABEL].to_numpy())
    base_scores = baseline.decision_function(frame.loc[:, list(ULB_FEATURES)].to_numpy())
    return {
        "app": "fraud",
        "model": version.ref,
        "data": str(data_csv),
        "n": len(frame),
        "metrics": fraud_metrics(labels, logits),
        "baseline": {"name": "hist_gbdt", **fraud_metrics(labels, base_scores)},
    }
