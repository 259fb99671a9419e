"""ResumableDataLoader: per-epoch order from (seed, epoch), position saved and restored."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from core.registry import fingerprint_arrays
from core.training.data import ResumableDataLoader, as_loader, dataset_fingerprint


def _ds(n: int = 10) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def _ids(batches: list) -> list[int]:
    return [int(v) for b in batches for v in b[0]]


def test_order_depends_on_seed_and_epoch_only() -> None:
    a = ResumableDataLoader(_ds(), batch_size=3, shuffle=True, seed=1)
    b = ResumableDataLoader(_ds(), batch_size=3, shuffle=True, seed=1)
    torch.manual_seed(99)  # the global RNG plays no part
    assert _ids(list(a)) == _ids(list(b))
    first = _ids(list(a))
    a.sampler.set_epoch(1)
    assert sorted(_ids(list(a))) == list(range(10)) and _ids(list(a)) != first


def test_mid_epoch_state_round_trip() -> None:
    loader = ResumableDataLoader(_ds(), batch_size=3, shuffle=True, seed=0)
    loader.sampler.set_epoch(2)
    full = _ids(list(loader))
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    fresh = ResumableDataLoader(_ds(), batch_size=3, shuffle=True, seed=0)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(2)
    assert _ids(list(fresh)) == full[6:]
    assert fresh.state_dict() == {"epoch": 2, "batches": 4}
    assert _ids(list(fresh)) == full  # the skip is one-shot


def test_finished_epoch_resumes_at_the_next() -> None:
    loader = ResumableDataLoader(_ds(), batch_size=5, shuffle=False, seed=0)
    loader.load_state_dict({"epoch": 0, "batches": 2})
    loader.sampler.set_epoch(1)
    assert _ids(list(loader)) == list(range(10))


def test_ranks_take_interleaved_shares_of_the_single_process_batches() -> None:
    single = ResumableDataLoader(_ds(12), batch_size=6, shuffle=True, seed=4)
    ranks = [ResumableDataLoader(_ds(12), batch_size=2, shuffle=True, seed=4, num_replicas=3) for _ in range(3)]
    for r, loader in enumerate(ranks):
        loader.sampler.fixed_rank = r
    for epoch in (0, 1):
        for loader in (single, *ranks):
            loader.sampler.set_epoch(epoch)
        shares = [[_ids([b]) for b in loader] for loader in ranks]
        for i, batch in enumerate(single):
            for r in range(3):
                assert _ids([batch])[r::3] == shares[r][i]
    assert len(ranks[0]) == 2 and isinstance(ranks[0].sampler, DistributedSampler)  # Lightning keeps it


def test_a_rank_resumes_at_its_own_position_and_pads_like_distributed_sampler() -> None:
    loader = ResumableDataLoader(_ds(10), batch_size=2, shuffle=False, seed=0, num_replicas=4)
    loader.sampler.fixed_rank = 3
    assert len(loader.sampler) == 3 and _ids(list(loader)) == [3, 7, 1]  # padded with the epoch's first indices
    loader.load_state_dict({"epoch": 0, "batches": 1})
    assert _ids(list(loader)) == [1]
    unranked = ResumableDataLoader(_ds(10), batch_size=2, shuffle=False, seed=0, num_replicas=2)
    with pytest.raises(RuntimeError, match="num_replicas=2 needs a rank"):
        list(unranked)


def test_as_loader_rebuilds_plain_loaders_and_refuses_junk() -> None:
    rebuilt = as_loader(DataLoader(_ds(), batch_size=4, shuffle=True), batch_size=99, shuffle=False, seed=0)
    assert isinstance(rebuilt, ResumableDataLoader) and rebuilt.batch_size == 4 and rebuilt.sampler.shuffle
    sequential = as_loader(DataLoader(_ds(), batch_size=4), batch_size=1, shuffle=True, seed=0)
    assert not sequential.sampler.shuffle
    assert not isinstance(as_loader(_ds(), batch_size=2, shuffle=True, seed=0, resumable=False), ResumableDataLoader)
    with pytest.raises(TypeError, match="expected a Dataset"):
        as_loader([1, 2, 3], batch_size=2, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        as_loader(_ds(), batch_size=0, shuffle=True, seed=0)


def test_dataset_fingerprint() -> None:
    ds = _ds()
    assert dataset_fingerprint(ds) == fingerprint_arrays(*ds.tensors)
    assert dataset_fingerprint(DataLoader(ds)) == fingerprint_arrays(*ds.tensors)
    assert dataset_fingerprint(Subset(ds, [1, 2])) == fingerprint_arrays(torch.tensor([1, 2]))
    assert dataset_fingerprint([1, 2]) is None
