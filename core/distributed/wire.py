"""Bytes on the wire: what each collective sends per rank, and the per-run counter every hook updates.

Counts are the bytes one rank sends under a bandwidth-optimal algorithm for ``world`` ranks (ring or
direct exchange), which is also what the alpha-beta cost model (:mod:`core.distributed.cost_model`) charges:

* all-reduce of ``n`` bytes: ``2 (W-1)/W n`` (reduce-scatter then all-gather around a ring);
* all-to-all of ``n`` bytes: ``(W-1)/W n`` (each rank keeps its own share);
* all-gather of ``n`` bytes contributed per rank: ``(W-1) n``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch.distributed as dist

__all__ = ["CommState", "allreduce_bytes", "alltoall_bytes", "allgather_bytes"]


def allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of an ``nbytes`` buffer."""
    return 2 * (world - 1) * nbytes // world


def alltoall_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in an all-to-all of an ``nbytes`` buffer split evenly over ``world`` ranks."""
    return (world - 1) * nbytes // world


def allgather_bytes(nbytes_per_rank: int, world: int) -> int:
    """Bytes one rank sends in an all-gather where each rank contributes ``nbytes_per_rank``."""
    return (world - 1) * nbytes_per_rank


@dataclass
class CommState:
    """State handed to a DDP communication hook; counts what this rank sends.

    Attributes:
        process_group: the group to reduce over (None: the default group).
        bytes_sent: bytes this rank put on the wire since the start.
        fp32_bytes: what a plain fp32 ring all-reduce of the same buckets would have sent.
        buckets: hook calls (one per DDP bucket per step).
    """

    process_group: dist.ProcessGroup | None = None
    bytes_sent: int = 0
    fp32_bytes: int = 0
    buckets: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def world(self) -> int:
        return dist.get_world_size(self.process_group)

    def count(self, sent: int, numel: int) -> None:
        """Record one bucket: ``sent`` bytes on the wire for ``numel`` gradient elements."""
        with self._lock:  # hooks may fire from autograd worker threads
            self.bytes_sent += sent
            self.fp32_bytes += allreduce_bytes(4 * numel, self.world())
            self.buckets += 1

    @property
    def ratio(self) -> float:
        """fp32 bytes / bytes sent (how many times fewer bytes than uncompressed); 1.0 before any traffic."""
        return self.fp32_bytes / self.bytes_sent if self.bytes_sent else 1.0
