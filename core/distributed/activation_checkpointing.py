"""Activation checkpointing: recompute chosen blocks' activations in backward instead of storing them.

``Trainer(activation_checkpointing=True)`` picks the model's repeated blocks (see :func:`block_classes`);
a sequence of module classes picks exactly those. Under FSDP the classes go to Lightning's
``activation_checkpointing_policy``; otherwise torch's non-reentrant checkpoint wrapper is applied
here (it keeps ``state_dict`` keys unchanged, so checkpoints and registry entries do not see it).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
)

__all__ = ["ActivationCheckpointing", "block_classes", "resolve_checkpoint_classes", "checkpoint_blocks"]

log = logging.getLogger(__name__)

ActivationCheckpointing = bool | Sequence[type[nn.Module]]


def block_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """Classes of the repeated blocks: children of ``ModuleList``/``Sequential`` containers that hold
    parameters and occur at least twice in one container (Transformer layers, ResNet bottlenecks).

    Composite blocks (with sub-modules) win over single layers: a Transformer's ``Block`` is
    chosen, not the two ``Linear`` layers of its MLP. Single layers only when nothing else repeats.
    """
    found: dict[type[nn.Module], bool] = {}  # class -> composite
    for container in model.modules():
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            continue
        kids = [c for c in container.children() if any(True for _ in c.parameters())]
        for cls, k in Counter(type(c) for c in kids).items():
            if k >= 2 and not issubclass(cls, nn.ModuleList | nn.Sequential):
                found[cls] = any(True for c in kids if type(c) is cls for _ in c.children())
    composite = tuple(c for c, is_composite in found.items() if is_composite)
    return composite or tuple(found)


def resolve_checkpoint_classes(model: nn.Module, setting: ActivationCheckpointing) -> tuple[type[nn.Module], ...]:
    """What ``activation_checkpointing=setting`` checkpoints in ``model`` (empty for False)."""
    if setting is False:
        return ()
    if setting is True:
        classes = block_classes(model)
        if not classes:
            raise ValueError(
                f"activation_checkpointing=True found no repeated blocks in {type(model).__name__}; "
                "pass the block classes instead, e.g. activation_checkpointing=[MyBlock]"
            )
        return classes
    classes = tuple(setting)
    bad = [c for c in classes if not (isinstance(c, type) and issubclass(c, nn.Module))]
    if not classes or bad:
        raise TypeError(f"activation_checkpointing must be a bool or nn.Module classes, got {setting!r}")
    return classes


def checkpoint_blocks(model: nn.Module, classes: tuple[type[nn.Module], ...]) -> int:
    """Wrap every instance of ``classes`` in ``model`` (once); returns how many modules are checkpointed."""
    if not any(isinstance(m, CheckpointWrapper) for m in model.modules()):
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, classes))
    wrapped = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
    log.info("activation checkpointing: %d modules of %s", wrapped, ", ".join(c.__name__ for c in classes))
    return wrapped
