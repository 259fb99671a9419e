"""Pruning: structured (channels physically removed) and unstructured (weights set to zero)."""

from core.compression.pruning.channel import PRUNING_METRICS, ChannelPruner, prune_channels
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
    "cubic_sparsity",
    "magnitude_masks",
    "magnitude_prune",
    "prune_channels",
    "prune_gradually",
]
