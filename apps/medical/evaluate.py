"""``keel eval medical``: score a registered model on any split of an npz in the PneumoniaMNIST format (SPEC 5).

Metrics: ``auc``; ``accuracy`` of the model's decisions (threshold set for its decision prior: by default
its training prevalence, ``--decision-prior`` states another, e.g. 0.625 for the official test split);
``ece`` of the calibrated probabilities (temperature scaling, for the training prevalence; with
``--adapt-prior`` re-targeted to the prevalence of the scored images, estimated from them without
labels by EM: off by default, as EM measured unstable on weakly trained models, see the README);
``ece_uncalibrated`` of the raw network output ``sigmoid(z)``; plus balanced accuracy, sensitivity,
specificity, the prevalence used and the accuracy of a 0.5 cut of either probability.

Run::

    keel eval medical --data pneumoniamnist_dev.npz --split val [--model medical@3]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.medical.calibration import binary_metrics, estimate_prior, expected_calibration_error
from apps.medical.data import load_split
from apps.medical.model import MedicalPredictor, load_predictor

__all__ = ["evaluate", "predictor_metrics"]


def predictor_metrics(
    predictor: MedicalPredictor, images: np.ndarray, labels: np.ndarray, *, adapt_prior: bool = False
) -> dict[str, float]:
    """Every metric of ``predictor`` on images (N, H, W) uint8 with labels (N,).

    With ``adapt_prior`` the calibrated probabilities are re-targeted to the prevalence of ``images``,
    estimated without labels (:func:`estimate_prior`); ``ece`` is then measured on those, and
    ``ece_train_prior`` on the probabilities for the training prevalence.
    """
    logits = predictor.logits(images)
    at_train_prior = predictor.calibrated(logits).numpy()
    prior = estimate_prior(at_train_prior, predictor.train_prior) if adapt_prior else predictor.train_prior
    probs = predictor.calibrated(logits, prior=prior).numpy()
    metrics = binary_metrics(labels, probs, predictor.decide(logits).numpy())
    metrics["ece_uncalibrated"] = expected_calibration_error(torch.sigmoid(logits).numpy(), labels)
    metrics["ece_train_prior"] = expected_calibration_error(at_train_prior, labels)
    metrics["prior_estimated"] = prior
    metrics["accuracy_at_train_prior"] = float(((at_train_prior >= 0.5).astype(int) == labels).mean())
    metrics["accuracy_at_estimated_prior"] = float(((probs >= 0.5).astype(int) == labels).mean())
    metrics["threshold"] = predictor.threshold
    return metrics


def evaluate(
    model_ref: str,
    data: str | Path,
    split: str,
    *,
    registry: Any,
    adapt_prior: bool = False,
    decision_prior: float | None = None,
) -> dict[str, Any]:
    """The SPEC section 5 object for ``model_ref`` on ``<split>_images`` / ``<split>_labels`` of ``data``.

    ``decision_prior`` overrides the prevalence the model's decisions are made for (default: the one it was
    registered with, ``MedicalTrainConfig.decision_prior``, which defaults to the training prevalence).
    """
    version, state = registry.load(model_ref)
    xrays = load_split(data, split)
    predictor = load_predictor(version, state)
    if decision_prior is not None:
        if not 0 < decision_prior < 1:
            raise ValueError(f"decision prior must be in (0, 1), got {decision_prior}")
        predictor.decision_prior = decision_prior
    return {
        "app": "medical",
        "model": version.ref,
        "data": str(data),
        "split": split,
        "n": len(xrays),
        "decision_prior": predictor.decision_prior,
        "metrics": predictor_metrics(predictor, xrays.images, xrays.labels, adapt_prior=adapt_prior),
    }
