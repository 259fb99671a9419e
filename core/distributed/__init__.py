"""Distributed training (SPEC 2.2): DDP/FSDP through Lightning, gradient-compression hooks, a cost model."""

from core.distributed.activation_checkpointing import block_classes, checkpoint_blocks, resolve_checkpoint_classes
from core.distributed.hooks import COMPRESSIONS, CommHook, build_comm_hook
from core.distributed.int8 import Int8State, int8_hook
from core.distributed.strategy import (
    STRATEGIES,
    CommBytesLogger,
    build_strategy,
    check_distributed,
)
from core.distributed.wire import CommState

__all__ = [
    "COMPRESSIONS",
    "STRATEGIES",
    "CommBytesLogger",
    "CommHook",
    "CommState",
    "Int8State",
    "block_classes",
    "build_comm_hook",
    "build_strategy",
    "check_distributed",
    "checkpoint_blocks",
    "int8_hook",
    "resolve_checkpoint_classes",
]
