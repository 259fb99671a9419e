"""Token-budget length bucketing: every request planned exactly once, budgets kept, padding small."""

from __future__ import annotations

import numpy as np
import pytest

from core.lite import TokenBudgetPlanner, pad_batch, padded_length, plan_token_batches


def long_tailed(n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.minimum(rng.lognormal(4.0, 1.0, n).astype(int) + 1, 512)]


def padded_cost(groups: list[list[int]], lengths: list[int], multiple: int = 1) -> int:
    return sum(len(g) * padded_length(max(lengths[i] for i in g), multiple) for g in groups)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("max_tokens", "max_batch", "multiple"), [(512, None, 1), (2048, 16, 8), (100, 4, 1)])
def test_plan_is_a_partition_within_budget(seed: int, max_tokens: int, max_batch: int | None, multiple: int) -> None:
    lengths = long_tailed(200, seed)
    groups = plan_token_batches(lengths, max_tokens=max_tokens, max_batch_size=max_batch, pad_multiple=multiple)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every request exactly once
    for g in groups:
        assert g, "no empty group"
        cost = len(g) * padded_length(max(lengths[i] for i in g), multiple)
        assert cost <= max_tokens or len(g) == 1  # only a request too long on its own may exceed the budget
        assert max_batch is None or len(g) <= max_batch
        assert [lengths[i] for i in g] == sorted(lengths[i] for i in g)
    oldest = [min(g) for g in groups]
    assert oldest == sorted(oldest)  # first come, first served between groups


def test_bucketing_pads_far_less_than_padding_to_the_longest() -> None:
    lengths = long_tailed(256, 0)
    groups = plan_token_batches(lengths, max_tokens=4096)
    chunks = [list(range(i, i + 32)) for i in range(0, 256, 32)]  # arrival order, batches of 32
    assert padded_cost(groups, lengths) < 0.5 * padded_cost(chunks, lengths)
    assert sum(lengths) / padded_cost(groups, lengths) > 0.75


def test_plan_edge_cases() -> None:
    assert plan_token_batches([], max_tokens=10) == []
    assert plan_token_batches([50, 3, 3], max_tokens=10) == [[0], [1, 2]]  # 50 > budget: alone, still planned
    assert plan_token_batches([4, 4, 4], max_tokens=12) == [[0, 1, 2]]  # exactly the budget fits
    assert plan_token_batches([4, 4, 4], max_tokens=11) == [[0], [1, 2]]  # as cheap as [[0, 1], [2]]
    assert plan_token_batches([0, 0], max_tokens=2) == [[0, 1]]  # empty sequences take a slot
    assert plan_token_batches([5] * 4, max_tokens=100, max_batch_size=3) == [[0], [1, 2, 3]]


def test_call_cost_trades_padding_against_calls() -> None:
    lengths = [10, 12, 100, 101]
    # Padding 10 -> 12 costs 2 tokens, 100 -> 101 one: worth it when a call costs more than that, not when free.
    assert plan_token_batches(lengths, max_tokens=1000, call_cost=16) == [[0, 1], [2, 3]]
    assert plan_token_batches(lengths, max_tokens=1000, call_cost=0) == [[0], [1], [2], [3]]
    # Padding the two short ones to 101 (180 tokens) is never worth one call of 16.
    assert plan_token_batches(lengths, max_tokens=1000, call_cost=100) == [[0, 1], [2, 3]]
    assert plan_token_batches(lengths, max_tokens=1000, call_cost=500) == [[0, 1, 2, 3]]


def test_the_plan_is_the_cheapest_contiguous_partition() -> None:
    lengths = long_tailed(9, 3)
    groups = plan_token_batches(lengths, max_tokens=10_000, call_cost=20)
    order = sorted(range(9), key=lambda i: lengths[i])
    best = min(  # brute force over every way to cut the sorted run
        sum(20 + len(g) * max(lengths[i] for i in g) for g in cut)
        for mask in range(2**8)
        for cut in [_cut(order, mask)]
    )
    assert sum(20 + len(g) * max(lengths[i] for i in g) for g in groups) == best


def _cut(order: list[int], mask: int) -> list[list[int]]:
    groups, current = [], [order[0]]
    for k, i in enumerate(order[1:]):
        if mask >> k & 1:
            groups.append(current)
            current = []
        current.append(i)
    return [*groups, current]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": 8, "max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"max_tokens": 8, "pad_multiple": 0}, "pad_multiple must be >= 1"),
        ({"max_tokens": 8, "call_cost": -1}, "call_cost must be >= 0"),
    ],
)
def test_bad_settings_fail_when_the_planner_is_built(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBudgetPlanner(**kwargs)
    with pytest.raises(ValueError, match="lengths must be >= 0; index 1"):
        plan_token_batches([1, -1], max_tokens=8)


def test_planner_measures_items_with_its_length_function() -> None:
    planner = TokenBudgetPlanner(max_tokens=8, call_cost=8, length=lambda item: item["n"])
    assert planner([{"n": 5}, {"n": 1}, {"n": 2}]) == [[0], [1, 2]]


def test_pad_batch_token_ids_and_feature_sequences() -> None:
    batch, lengths = pad_batch([[1, 2, 3], [4]], pad_value=0, pad_multiple=4, dtype="int64")
    assert batch.dtype == np.int64 and batch.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert lengths.tolist() == [3, 1]
    feats, lengths = pad_batch([np.ones((2, 3)), np.full((5, 3), 2.0)], pad_value=-1)
    assert feats.shape == (2, 5, 3) and (feats[0, 2:] == -1).all() and (feats[1] == 2).all()
    with pytest.raises(ValueError, match=r"sequence 1 has shape \(2, 4\)"):
        pad_batch([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([])
