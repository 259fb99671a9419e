"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) and the metrics.

Binary case: the calibrated probability is ``sigmoid(z / T + b)``; ``T`` (and, with enough held-out
images, ``b``, else fixed at the training prior's log-odds; see :class:`apps.medical.model.MedicalPredictor`)
minimise the negative log-likelihood on held-out images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

__all__ = ["binary_metrics", "estimate_prior", "expected_calibration_error", "fit_temperature"]


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, *, bias: float = 0.0, fit_bias: bool = False
) -> tuple[float, float]:
    """``(T, b)`` minimising the NLL of ``sigmoid(logits / T + b)`` (LBFGS on log T, and on b if ``fit_bias``).

    ``b`` stays at ``bias`` unless ``fit_bias``. One class only: nothing to calibrate against, ``(1, bias)``.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    if z.numel() == 0 or y.min() == y.max():
        return 1.0, bias
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(float(bias), dtype=torch.float64, requires_grad=fit_bias)
    opt = torch.optim.LBFGS([log_t, b] if fit_bias else [log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z / log_t.exp() + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    t, fitted = float(log_t.detach().exp()), float(b.detach())
    if not (math.isfinite(t) and math.isfinite(fitted)):
        return 1.0, bias
    return min(max(t, 1e-2), 1e2), fitted


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, bins: int = 15) -> float:
    """ECE over equal-width bins of the predicted class's confidence (the usual multi-class definition, 2 classes)."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    confidence = np.maximum(probs, 1 - probs)
    correct = ((probs >= 0.5).astype(int) == labels).astype(np.float64)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def binary_metrics(labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray) -> dict[str, float]:
    """AUC (of the probabilities), accuracy (of the decisions), balanced accuracy, ECE."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise ValueError(f"metrics need both classes; the labels hold only {int(labels[0])} ({len(labels)} images)")
    decisions = np.asarray(decisions)
    recall = [float((decisions[labels == c] == c).mean()) for c in (0, 1)]
    return {
        "auc": float(roc_auc_score(labels, probs)),
        "accuracy": float((decisions == labels).mean()),
        "balanced_accuracy": float(np.mean(recall)),
        "sensitivity": recall[1],
        "specificity": recall[0],
        "ece": expected_calibration_error(probs, labels),
    }


def estimate_prior(probs: np.ndarray, train_prior: float, *, iters: int = 500, tol: float = 1e-7) -> float:
    """The pneumonia prevalence of an unlabelled set, by EM on calibrated probabilities (label shift).

    Saerens, Latinne & Decaestecker, "Adjusting the Outputs of a Classifier to New a Priori Probabilities"
    (Neural Computation 2002): re-weight each posterior by new/old prior, average, repeat. Uses no labels.
    """
    p = np.clip(np.asarray(probs, np.float64), 1e-6, 1 - 1e-6)
    prior = float(train_prior)
    for _ in range(iters):
        pos = p * prior / train_prior
        neg = (1 - p) * (1 - prior) / (1 - train_prior)
        new = float(np.mean(pos / (pos + neg)))
        if abs(new - prior) < tol:
            return new
        prior = min(max(new, 1e-4), 1 - 1e-4)
    return prior
