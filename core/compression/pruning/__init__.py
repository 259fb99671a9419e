"""Pruning: structured (channels; Transformer heads, FFN neurons, layers, hidden size: physically removed) and
unstructured (weights set to zero)."""

from core.compression.pruning.channel import PRUNING_METRICS, ChannelPruner, prune_channels
from core.compression.pruning.encoder import PrunableEncoderLayer, convert
from core.compression.pruning.transformer import ResidualStream, TransformerPruner, find_stream, prune_transformer
from core.compression.pruning.unstructured import (
    GradualMagnitudePruning,
    cubic_sparsity,
    magnitude_masks,
    magnitude_prune,
    prune_gradually,
)

__all__ = [
    "PRUNING_METRICS",
    "ChannelPruner",
    "GradualMagnitudePruning",
    "PrunableEncoderLayer",
    "ResidualStream",
    "TransformerPruner",
    "convert",
    "cubic_sparsity",
    "find_stream",
    "magnitude_masks",
    "magnitude_prune",
    "prune_channels",
    "prune_gradually",
    "prune_transformer",
]
