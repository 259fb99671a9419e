"""Compression toolkit (SPEC 2.6): eight techniques behind one registry, each reporting before / after.

1. :class:`ChannelPruner` - structured channel pruning on a traced dependency graph;
2. :func:`magnitude_prune` / :func:`prune_gradually` - unstructured, global, gradual;
3. :func:`quantize_dynamic` - dynamic int8 (Linear / LSTM / GRU);
4. :func:`quantize_static` - static int8 post-training quantisation with calibration (FX, x86);
5. :func:`train_qat` - quantisation-aware training through the Trainer;
6. :func:`distill` - knowledge distillation (logits and features) through the Trainer;
7. :func:`factorize` - low-rank (SVD) factorisation of Linear and Conv layers;
8. :func:`cast_weights` (fp16 / bf16) and :func:`cluster_weights`.

Plus :class:`TransformerPruner` / :func:`prune_transformer`: attention heads, FFN neurons, layers and the
hidden size of Transformer encoders, iteratively with distillation.

:func:`compress` runs any of them by name (:data:`TECHNIQUES`) and returns ``(model, report)``.
"""

from core.compression.casting import cast_weights, cluster_weights
from core.compression.distillation import distill
from core.compression.lowrank import LowRankSettings, factorize
from core.compression.pruning import (
    ChannelPruner,
    TransformerPruner,
    magnitude_prune,
    prune_gradually,
    prune_transformer,
)
from core.compression.quantization import quantize_dynamic, quantize_static, train_qat
from core.compression.report import CompressionReport, CompressionResult, ModelStats, accuracy, build_report
from core.compression.techniques import TECHNIQUES, CompressionContext, compress, finetune

__all__ = [
    "TECHNIQUES",
    "ChannelPruner",
    "CompressionContext",
    "CompressionReport",
    "CompressionResult",
    "LowRankSettings",
    "ModelStats",
    "TransformerPruner",
    "accuracy",
    "build_report",
    "cast_weights",
    "cluster_weights",
    "compress",
    "distill",
    "factorize",
    "finetune",
    "magnitude_prune",
    "prune_gradually",
    "prune_transformer",
    "quantize_dynamic",
    "quantize_static",
    "train_qat",
]
