"""Fraud features: hand-computed values on tiny transaction lists, delayed terminal risk, train/serve identity."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from apps.fraud.features import FEATURE_NAMES, SEQ_FEATURES, FraudFeatureBuilder
from core.features import FeatureStore, create_store

DAY = 86400.0
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
SEQ = {name: i for i, name in enumerate(SEQ_FEATURES)}


def _tx(tx_id: int, ts: float, card: str, terminal: str, amount: float, label: int | None = None) -> dict:
    tx = {"tx_id": tx_id, "ts": ts, "card_id": card, "terminal_id": terminal, "amount": amount}
    if label is not None:
        tx["label"] = label
    return tx


def _feature(dense: np.ndarray, row: int, name: str) -> float:
    return float(dense[row, COL[name]])


def test_card_and_terminal_features_by_hand() -> None:
    txns = [
        _tx(0, 0.0, "c1", "t1", 10.0),
        _tx(1, 1800.0, "c1", "t2", 30.0),
        _tx(2, 1800.0, "c2", "t2", 50.0),  # same time and terminal as tx 1: neither sees the other
        _tx(3, 7200.0, "c1", "t1", 100.0),
    ]
    dense, seq, lengths = FraudFeatureBuilder(history=4).transform(txns)
    assert dense.shape == (4, len(FEATURE_NAMES)) and dense.dtype == np.float32
    want_tx3 = {
        "log_amount": math.log1p(100.0),
        "hour_sin": math.sin(2 * math.pi * 2 / 24),
        "card_count_1h": 0,  # [3600, 7200) is empty
        "card_count_1d": 2,
        "card_sum_7d": 40.0,
        "card_mean_7d": 20.0,
        "card_std_7d": 10.0,
        "amount_over_card_mean_7d": 5.0,
        "amount_zscore_card_7d": 80.0 / 11.0,
        "card_log_time_since_last": math.log1p(5400.0),
        "card_distinct_terminals_7d": 2,
        "terminal_count_1d": 1,
        "terminal_sum_1d": 10.0,
        "terminal_log_time_since_last": math.log1p(7200.0),
        "terminal_risk": 0.0,
    }
    for name, value in want_tx3.items():
        assert _feature(dense, 3, name) == pytest.approx(value, rel=1e-6), name
    # tx 1: one earlier card transaction -> no z-score yet; tx 2: a new card and a terminal with no strict past
    assert _feature(dense, 1, "card_count_1h") == 1 and _feature(dense, 1, "amount_zscore_card_7d") == 0.0
    assert _feature(dense, 1, "amount_over_card_mean_7d") == pytest.approx(3.0)
    assert _feature(dense, 2, "terminal_count_7d") == 0 and _feature(dense, 2, "card_count_7d") == 0
    assert _feature(dense, 2, "amount_over_card_mean_7d") == 1.0
    assert _feature(dense, 2, "card_log_time_since_last") == pytest.approx(math.log1p(30 * DAY))
    assert lengths.tolist() == [0, 1, 0, 2]
    assert seq.shape == (4, 4, len(SEQ_FEATURES))
    expected_steps = [
        [math.log1p(10.0), math.log1p(1800.0), 0.0, 1.0, 1.0],  # at t1 like tx 3
        [math.log1p(30.0), math.log1p(5400.0), math.sin(math.pi / 24), math.cos(math.pi / 24), 0.0],
    ]
    np.testing.assert_allclose(seq[3, :2], expected_steps, rtol=1e-6, atol=1e-7)
    assert not seq[3, 2:].any() and not seq[0].any()


def test_ties_give_the_same_features_in_either_order() -> None:
    a, b = _tx(1, 1800.0, "c1", "t2", 30.0), _tx(2, 1800.0, "c2", "t2", 50.0)
    first = FraudFeatureBuilder().transform([a, b])[0]
    second = FraudFeatureBuilder().transform([b, a])[0]
    np.testing.assert_array_equal(first, second[::-1])


def _risk_columns(dense: np.ndarray) -> list[tuple[float, float, float]]:
    cols = [COL[n] for n in ("terminal_delayed_tx_count", "terminal_delayed_fraud_count", "terminal_risk")]
    return [tuple(float(v) for v in row) for row in dense[:, cols]]


RISK_TXNS = [  # (ts, label) at one terminal; label None = a live transaction without feedback
    (0.0, 1),
    (3600.0, 0),
    (DAY + 3600.0, None),
    (DAY + 3601.0, None),
    (2 * DAY, 1),
    (8 * DAY + 1.0, None),
]
# With a 1-day delay the risk window of a transaction at t is [t - 8d, t - 1d).
RISK_WANT = [(0, 0, 0.0), (0, 0, 0.0), (1, 1, 1.0), (2, 1, 0.5), (2, 1, 0.5), (4, 1, 0.25)]


def test_terminal_risk_only_uses_labels_known_after_the_delay() -> None:
    txns = [_tx(i, ts, f"c{i}", "T", 20.0, label) for i, (ts, label) in enumerate(RISK_TXNS)]
    dense, _, _ = FraudFeatureBuilder(label_delay_s=DAY).transform(txns)
    assert _risk_columns(dense) == RISK_WANT


def test_online_feedback_matches_the_training_replay() -> None:
    txns = [_tx(i, ts, f"c{i}", "T", 20.0, label) for i, (ts, label) in enumerate(RISK_TXNS)]
    online = FraudFeatureBuilder(label_delay_s=DAY)
    rows, feedback = [], []
    for tx in txns:
        online.record_labels([f for f in feedback if f[1] + DAY <= tx["ts"]])
        feedback = [f for f in feedback if f[1] + DAY > tx["ts"]]
        live = {k: v for k, v in tx.items() if k != "label"}
        rows.append(online.transform([live])[0])
        if tx.get("label") is not None:
            feedback.append(("T", tx["ts"], tx["label"]))
    assert _risk_columns(np.concatenate(rows)) == RISK_WANT


def _random_txns(seed: int, n: int = 250) -> list[dict]:
    rng = random.Random(seed)
    clock, txns = 0.0, []
    for i in range(n):
        clock += rng.choice([0.0, rng.expovariate(1 / 3000)])
        amount = round(rng.uniform(1, 300), 2)
        txns.append(_tx(i, round(clock), f"c{rng.randrange(6)}", f"t{rng.randrange(4)}", amount, rng.random() < 0.1))
    return txns


def test_one_batch_equals_chunks_equals_one_by_one() -> None:
    txns = _random_txns(0)
    whole = FraudFeatureBuilder(label_delay_s=DAY).transform(txns)
    chunked_builder, single_builder = FraudFeatureBuilder(label_delay_s=DAY), FraudFeatureBuilder(label_delay_s=DAY)
    chunks = [chunked_builder.transform(txns[i : i + 37]) for i in range(0, len(txns), 37)]
    singles = [single_builder.transform([tx]) for tx in txns]
    for parts in (chunks, singles):
        for got, want in zip((np.concatenate(p) for p in zip(*parts, strict=True)), whole, strict=True):
            np.testing.assert_array_equal(got, want)
    assert whole[0][:, COL["terminal_delayed_fraud_count"]].max() > 0  # the labels did reach the risk feature


def test_state_dict_round_trip_continues_exactly(tmp_path: Path) -> None:
    txns = _random_txns(2)
    whole = FraudFeatureBuilder(label_delay_s=DAY).transform(txns)
    first = FraudFeatureBuilder(label_delay_s=DAY)
    head = first.transform(txns[:100])
    assert first._pending  # labels not yet released travel with the state
    np.savez(tmp_path / "b.npz", **first.state_dict())
    second = FraudFeatureBuilder(label_delay_s=DAY)
    with np.load(tmp_path / "b.npz", allow_pickle=False) as state:
        second.load_state_dict(state)
    tail = second.transform(txns[100:])
    for h, t, w in zip(head, tail, whole, strict=True):
        np.testing.assert_array_equal(np.concatenate([h, t]), w)
    with pytest.raises(ValueError, match="label_delay_s"):
        FraudFeatureBuilder(label_delay_s=2 * DAY).load_state_dict(first.state_dict())


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[FeatureStore]:
    store = create_store("redis", url=redis_url, prefix=f"keel-test:{uuid.uuid4().hex}")
    yield store
    builder = FraudFeatureBuilder(store, label_delay_s=DAY)  # only for the names of the specs it wrote
    for spec in (builder.card_spec, builder.terminal_spec, builder.label_spec):
        store.clear(spec)
    store.close()


@pytest.mark.redis
def test_redis_backed_builder_matches_memory(redis_store: FeatureStore) -> None:
    txns = _random_txns(1, n=120)
    want = FraudFeatureBuilder(label_delay_s=DAY).transform(txns)
    got = FraudFeatureBuilder(redis_store, label_delay_s=DAY).transform(txns)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_shapes_for_empty_input_and_no_history() -> None:
    dense, seq, lengths = FraudFeatureBuilder().transform([])
    assert dense.shape == (0, len(FEATURE_NAMES)) and seq.shape == (0, 16, len(SEQ_FEATURES)) and lengths.shape == (0,)
    dense, seq, lengths = FraudFeatureBuilder(history=0).transform(_random_txns(2, n=10))
    assert dense.shape == (10, len(FEATURE_NAMES)) and seq.shape == (10, 0, len(SEQ_FEATURES))
    assert not lengths.any()


@pytest.mark.parametrize(
    ("tx", "message"),
    [
        ({"tx_id": 7, "ts": 1.0, "card_id": "c", "terminal_id": "t"}, r"tx_id=7.*lacks \['amount'\]"),
        (_tx(8, 1.0, "c", "t", -5.0), "tx_id=8.*amount must be >= 0"),
        (_tx(9, math.nan, "c", "t", 5.0), "tx_id=9.*ts must be finite"),
        (_tx(10, 1.0, "c", "t", 5.0, label=2), "tx_id=10.*label must be 0 or 1"),
    ],
)
def test_bad_transactions_are_named(tx: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FraudFeatureBuilder().transform([_tx(0, 0.0, "c", "t", 1.0), tx])


def test_bad_builder_settings_and_labels() -> None:
    with pytest.raises(ValueError, match="history"):
        FraudFeatureBuilder(history=-1)
    with pytest.raises(ValueError, match="label_delay_s"):
        FraudFeatureBuilder(label_delay_s=-1.0)
    with pytest.raises(ValueError, match="label 0 .*terminal_id='t'.*0 or 1"):
        FraudFeatureBuilder().record_labels([("t", 1.0, 5)])
