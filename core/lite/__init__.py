"""Lite inference engine (SPEC 2.7): exported models on ONNX Runtime (CPU) or TorchScript, length-bucketed batching.

- :class:`LiteModel`: load an export from a file or a registry ref, ``predict(inputs)``.
- :func:`plan_token_batches` / :class:`TokenBudgetPlanner`: group variable-length requests of similar length under a
  token budget instead of padding every batch to its longest sequence.
- :class:`SequencePredictor` / :func:`sequence_loader`: serve a lite sequence model from :mod:`core.serving`.
"""

from core.lite.artifact import FORMATS, ExportMeta
from core.lite.bucketing import TokenBudgetPlanner, pad_batch, padded_length, plan_token_batches
from core.lite.predictor import PaddingStats, SequencePredictor, sequence_loader
from core.lite.runtime import BACKENDS, LiteInputError, LiteModel

__all__ = [
    "BACKENDS",
    "FORMATS",
    "ExportMeta",
    "LiteInputError",
    "LiteModel",
    "PaddingStats",
    "SequencePredictor",
    "TokenBudgetPlanner",
    "pad_batch",
    "padded_length",
    "plan_token_batches",
    "sequence_loader",
]
