"""Data loading that can resume mid-epoch exactly, and data fingerprints for the registry.

A ``ResumableDataLoader`` draws each epoch's order from ``(seed, epoch)`` alone and tells
Lightning (through ``state_dict`` / ``load_state_dict``, which Lightning stores in its checkpoints)
how many batches of the current epoch it has handed out. On resume it replays the same order and
skips those batches, so a killed run continues on exactly the batch it would have seen next.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from core.registry.fingerprint import fingerprint_arrays

__all__ = ["EpochSampler", "ResumableDataLoader", "as_loader", "dataset_fingerprint"]

log = logging.getLogger(__name__)


class EpochSampler(DistributedSampler):
    """Indices ``0..n-1`` shuffled from ``(seed, epoch)`` only, this rank's share of them, with a one-shot skip.

    With ``num_replicas`` processes every rank draws the same order, pads it to a multiple of
    ``num_replicas`` (as ``DistributedSampler`` does) and takes every ``num_replicas``-th index from its
    rank on, so rank ``r``'s ``i``-th batch is the ``r``-th interleaved share of the ``i``-th batch of one
    process with ``num_replicas`` times the batch size. It is a ``DistributedSampler`` so that Lightning
    keeps it instead of swapping in its own, which would lose the position within the epoch.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, num_replicas: int = 1, rank: int | None = None) -> None:
        # Not DistributedSampler.__init__: it asks torch.distributed for the rank now, before Lightning has
        # started the processes. The rank is read when the epoch is iterated (``rank=None``).
        Sampler.__init__(self)
        if num_replicas < 1 or (rank is not None and not 0 <= rank < num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        self.n, self.shuffle, self.seed, self.num_replicas = n, shuffle, seed, num_replicas
        self.fixed_rank = rank
        self.drop_last = False
        self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip)

    def current_rank(self) -> int:
        """This process's rank: the one given, else torch.distributed's (0 with one replica)."""
        if self.fixed_rank is not None:
            return self.fixed_rank
        if self.num_replicas == 1:
            return 0
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"EpochSampler with num_replicas={self.num_replicas} needs a rank: pass rank= or iterate it "
                "inside a torch.distributed process group"
            )
        if dist.get_world_size() != self.num_replicas:
            raise RuntimeError(
                f"EpochSampler was built for {self.num_replicas} processes but the process group has "
                f"{dist.get_world_size()}: set devices and num_nodes to match the launch"
            )
        return dist.get_rank()

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start."""
        self.epoch = epoch

    def resume_at(self, epoch: int, samples: int) -> None:
        """Skip the first ``samples`` of this rank's indices the next time epoch ``epoch`` is iterated."""
        self.epoch, self._resume = epoch, (epoch, samples)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        if self.num_replicas > 1:
            pad = self.total_size - self.n
            order = torch.cat([order, order.repeat(math.ceil(pad / max(1, self.n)))[:pad]])
            order = order[self.current_rank() :: self.num_replicas]
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        yield from order[skip:].tolist()


class ResumableDataLoader(DataLoader):
    """A map-style DataLoader whose position (epoch, batches served) lives in Lightning checkpoints."""

    sampler: EpochSampler

    def __init__(
        self, dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, num_replicas: int = 1, **kwargs: Any
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        sampler = EpochSampler(n, shuffle=shuffle, seed=seed, num_replicas=num_replicas)
        # Own generator: worker base seeds must not draw from (and shift) the global RNG.
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._served = 0
        self._resume_batches: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._counting(super().__iter__())

    def _counting(self, batches: Iterator[Any]) -> Iterator[Any]:
        # Runs lazily at the first next(), i.e. after Lightning has called set_epoch for this epoch.
        resume, self._resume_batches = self._resume_batches, None
        self._served = resume[1] if resume is not None and resume[0] == self.sampler.epoch else 0
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Position within the current epoch."""
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position (a finished epoch resumes at the start of the next one)."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        assert self.batch_size is not None
        self.sampler.resume_at(epoch, batches * self.batch_size)
        self._resume_batches = (epoch, batches)


def as_loader(
    data: Any, *, batch_size: int, shuffle: bool, seed: int, resumable: bool = True, num_replicas: int = 1
) -> Any:
    """Turn a Dataset or a plain DataLoader into a ResumableDataLoader where that is possible.

    A DataLoader with a custom sampler/batch sampler, an IterableDataset or a LightningDataModule is
    returned unchanged (its mid-epoch resume is then as exact as the loader itself makes it). With
    ``resumable=False`` a Dataset becomes a plain DataLoader. ``num_replicas`` > 1 (training processes):
    each process's loader serves its share of every epoch, ``batch_size`` per process.
    """
    if isinstance(data, ResumableDataLoader) or (isinstance(data, DataLoader) and not resumable):
        return data
    if isinstance(data, DataLoader):
        return _rebuild(data, seed=seed, num_replicas=num_replicas)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not resumable:
            return DataLoader(data, batch_size=batch_size, shuffle=shuffle)
        return ResumableDataLoader(data, batch_size=batch_size, shuffle=shuffle, seed=seed, num_replicas=num_replicas)
    if isinstance(data, Dataset | DataLoader):
        return data
    raise TypeError(f"expected a Dataset, DataLoader or LightningDataModule, got {type(data).__name__}")


def _rebuild(loader: DataLoader, *, seed: int, num_replicas: int) -> DataLoader:
    sampler_ok = isinstance(loader.sampler, RandomSampler | SequentialSampler)
    if not sampler_ok or loader.batch_size is None or not hasattr(loader.dataset, "__len__"):
        log.warning("DataLoader with a custom sampler is used as is: mid-epoch resume may repeat or skip batches")
        return loader
    return ResumableDataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        num_replicas=num_replicas,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        persistent_workers=loader.persistent_workers,
    )


def dataset_fingerprint(data: Any) -> str | None:
    """SHA-256 of the tensors behind ``data`` (a loader, TensorDataset or Subset of one), else None."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    fingerprint = getattr(dataset, "fingerprint", None)
    if isinstance(fingerprint, str):
        return fingerprint
    if isinstance(dataset, TensorDataset):
        return fingerprint_arrays(*dataset.tensors)
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        idx = torch.as_tensor(list(dataset.indices))
        return fingerprint_arrays(*(t[idx] for t in dataset.dataset.tensors))
    return None
