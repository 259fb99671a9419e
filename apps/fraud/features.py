"""Per-card and per-terminal features of card transactions, one builder for training replay and for serving.

Features follow the "Reproducible Machine Learning for Credit Card Fraud Detection" handbook (Le Borgne et al.,
chapter 3.4): card velocity, amount against the card's own history, terminal activity and a terminal risk that
only uses labels old enough to be known. All state lives in a :class:`core.features.FeatureStore`, and
:meth:`FraudFeatureBuilder.transform` computes every transaction's features from the past and only then folds
the transaction in -- so replaying a training set in time order and scoring a live stream run the same code on
the same state and give the same numbers (train/serve consistency by construction).

"Past" is strictly earlier in time: reads happen just before ``ts`` (``nextafter(ts, -inf)``), so transactions
with equal timestamps never see each other, whatever order they arrive in. Window ``w`` therefore covers
``[ts - w, ts)`` up to float rounding.

Dense features (``FEATURE_NAMES``, in this order):
    log_amount: ``log1p(amount)``. hour_sin, hour_cos: time of day (``ts`` in seconds, day 0 at midnight).
    card_count_{1h,1d,7d}, card_sum_{1h,1d,7d}: the card's earlier transactions and their amounts.
    card_mean_7d, card_std_7d: mean and population std of those amounts over 7 days (0 without history).
    amount_over_card_mean_7d: ``amount / card_mean_7d`` (1.0 without history or with a zero mean).
    amount_zscore_card_7d: ``(amount - mean) / (std + 1)`` over 7 days, 0 with fewer than 2 earlier
        transactions; the +1 (one currency unit) keeps cards with constant amounts finite.
    card_log_time_since_last: ``log1p`` of seconds since the card's previous transaction, capped at 30 days.
    card_distinct_terminals_7d: distinct terminals the card used in 7 days.
    terminal_count_{1h,1d,7d}, terminal_sum_{1h,1d,7d}: the terminal's earlier transactions.
    terminal_log_time_since_last: as for the card, capped at 7 days.
    terminal_delayed_tx_count, terminal_delayed_fraud_count, terminal_risk: transactions, known frauds and their
        ratio at the terminal in ``[ts - delay - 7d, ts - delay)``; the denominator is the larger of the
        transaction count and the labelled count, so partial feedback never yields a risk above 1.

Sequence features (``SEQ_FEATURES``, per step of the card's last ``history`` transactions within 30 days, oldest
first, left-aligned and zero-padded; ``lengths`` says how many steps are real): log_amount, log_dt_next (``log1p``
of seconds to the next step, the last step's next being the current transaction), hour_sin, hour_cos,
same_terminal (1.0 if the step was at the current transaction's terminal).

Labels. Fraud labels are known ``label_delay_s`` after the transaction. Online, feed them through
:meth:`FraudFeatureBuilder.record_labels` when they arrive. In a training replay, give each transaction a
``label``: the builder holds it back and folds it in only once the replay clock passes ``ts + label_delay_s``,
which is exactly what the online path would have seen.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

import numpy as np

from core.features import FeatureStore, WindowFeatures, WindowSpec, create_store

__all__ = ["FEATURE_NAMES", "SEQ_FEATURES", "FraudFeatureBuilder", "Transaction"]

Transaction = Mapping[str, Any]  # tx_id, ts (s), card_id, terminal_id, amount[, label]

HOUR, DAY = 3600.0, 86400.0
VELOCITY = ((HOUR, "1h"), (DAY, "1d"), (7 * DAY, "7d"))
CARD_HISTORY_S = 30 * DAY
TERMINAL_GAP_CAP_S = 7 * DAY

FEATURE_NAMES: tuple[str, ...] = (
    "log_amount",
    "hour_sin",
    "hour_cos",
    *(f"card_count_{tag}" for _, tag in VELOCITY),
    *(f"card_sum_{tag}" for _, tag in VELOCITY),
    "card_mean_7d",
    "card_std_7d",
    "amount_over_card_mean_7d",
    "amount_zscore_card_7d",
    "card_log_time_since_last",
    "card_distinct_terminals_7d",
    *(f"terminal_count_{tag}" for _, tag in VELOCITY),
    *(f"terminal_sum_{tag}" for _, tag in VELOCITY),
    "terminal_log_time_since_last",
    "terminal_delayed_tx_count",
    "terminal_delayed_fraud_count",
    "terminal_risk",
)
SEQ_FEATURES: tuple[str, ...] = ("log_amount", "log_dt_next", "hour_sin", "hour_cos", "same_terminal")

_REQUIRED = ("ts", "card_id", "terminal_id", "amount")


def _time_of_day(ts: float) -> tuple[float, float]:
    angle = 2.0 * math.pi * (ts % DAY) / DAY
    return math.sin(angle), math.cos(angle)


def _parse(tx: Transaction, i: int) -> tuple[float, str, str, float, int | None]:
    """(ts, card, terminal, amount, label or None) of one transaction, or a ValueError naming it and the field."""
    try:
        raw_ts, raw_card, raw_terminal, raw_amount = tx["ts"], tx["card_id"], tx["terminal_id"], tx["amount"]
    except KeyError:
        missing = [k for k in _REQUIRED if k not in tx]
        raise ValueError(
            f"transaction {i} (tx_id={tx.get('tx_id')!r}) lacks {missing}; needs {list(_REQUIRED)}"
        ) from None
    ts, amount = float(raw_ts), float(raw_amount)
    if not math.isfinite(ts):
        raise ValueError(f"transaction {i} (tx_id={tx.get('tx_id')!r}): ts must be finite seconds, got {raw_ts!r}")
    if not (math.isfinite(amount) and amount >= 0):
        raise ValueError(f"transaction {i} (tx_id={tx.get('tx_id')!r}): amount must be >= 0, got {raw_amount!r}")
    label = tx.get("label")
    if label is not None and label not in (0, 1):  # the message is formatted only for a bad label
        _check_label(label, f"transaction {i} (tx_id={tx.get('tx_id')!r})")
    # Ids as strings, so an int id and its string form are one key in every backend.
    return ts, str(raw_card), str(raw_terminal), amount, None if label is None else int(label)


def _check_label(label: Any, where: str) -> int:
    if label not in (0, 1):
        raise ValueError(f"{where}: label must be 0 or 1, got {label!r}")
    return int(label)


class FraudFeatureBuilder:
    """Stateful feature builder over a feature store (see the module docstring for every feature).

    Args:
        store: where the per-card and per-terminal state lives; a fresh in-memory store by default. Give a
            shared (redis) store to several service replicas so they see one state.
        history: how many past card transactions the sequence holds (0 for none).
        label_delay_s: seconds after a transaction before its fraud label is known.
        allowed_lateness_s: how far a transaction may lag behind its card's / terminal's latest one and still be
            folded in (see :mod:`core.features`); later ones still get features but are not folded in.
    """

    def __init__(
        self,
        store: FeatureStore | None = None,
        *,
        history: int = 16,
        label_delay_s: float = 7 * DAY,
        allowed_lateness_s: float = 600.0,
    ) -> None:
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        if not (math.isfinite(label_delay_s) and label_delay_s >= 0):
            raise ValueError(f"label_delay_s must be >= 0 seconds, got {label_delay_s!r}")
        self.store = store if store is not None else create_store("memory")
        self.history = history
        self.label_delay_s = float(label_delay_s)
        # The delayed window [t - d - 7d, t - d) is the (d + 7d)-window minus the d-window.
        delayed = (self.label_delay_s, self.label_delay_s + 7 * DAY)
        velocity = tuple(w for w, _ in VELOCITY)
        self.card_spec = WindowSpec(
            name="fraud_card",
            windows=(*velocity, CARD_HISTORY_S),
            last_n=history,
            track_distinct=True,
            allowed_lateness=allowed_lateness_s,
        )
        term_windows = tuple(sorted({*velocity, *(w for w in delayed if w > 0)}))
        self.terminal_spec = WindowSpec(
            name="fraud_terminal", windows=term_windows, allowed_lateness=allowed_lateness_s
        )
        self.label_spec = WindowSpec(
            name="fraud_terminal_labels",
            windows=tuple(w for w in delayed if w > 0),
            # Feedback arrives out of order over up to a delay period; accept it all.
            allowed_lateness=max(self.label_delay_s, allowed_lateness_s),
        )
        self._term_velocity = itemgetter(*(term_windows.index(w) for w in velocity))  # picks 1h, 1d, 7d
        # Where the delayed window's two ends sit in each spec's windows (None: a zero delay has no inner window).
        self._term_delayed = _delayed_index(self.terminal_spec, delayed)
        self._label_delayed = _delayed_index(self.label_spec, delayed)
        self._pending: list[tuple[float, int, str, int]] = []  # replay labels not yet known: (ts, seq, terminal, y)
        self._pending_seq = 0

    def transform(self, txns: Sequence[Transaction]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features of each transaction from the strict past, folding each one into the state after it is read.

        Args:
            txns: transactions in time order (see :data:`Transaction`); a ``label`` key, if present and not None,
                is held back and used once it would be known (training replay).

        Returns:
            ``dense`` (B, len(FEATURE_NAMES)) float32, ``seq`` (B, history, len(SEQ_FEATURES)) float32 and
            ``lengths`` (B,) int64, the number of real steps of each sequence.
        """
        rows: list[list[float]] = []
        steps = _SeqSteps()
        store, card_spec, terminal_spec, label_spec = self.store, self.card_spec, self.terminal_spec, self.label_spec
        read, update, pending = store.read, store.update, self._pending  # bound once: this loop is the hot path
        for i, tx in enumerate(txns):
            ts, card, terminal, amount, y = _parse(tx, i)
            if pending and pending[0][0] <= ts - self.label_delay_s:
                self._release_labels(upto=ts - self.label_delay_s)
            before = math.nextafter(ts, -math.inf)
            card_f = read(card_spec, card, now=before)
            term_f = read(terminal_spec, terminal, now=before)
            rows.append(self._dense(ts, amount, card_f, term_f, read(label_spec, terminal, now=before)))
            steps.add(ts, terminal, card_f)
            update(card_spec, card, ts=ts, value=amount, distinct=terminal)
            update(terminal_spec, terminal, ts=ts, value=amount)
            if y is not None:
                heapq.heappush(pending, (ts, self._pending_seq, terminal, y))
                self._pending_seq += 1
        dense = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(FEATURE_NAMES))
        seq, lengths = steps.to_arrays(self.history)
        return dense, seq, lengths

    def record_labels(self, items: Sequence[tuple[str | int, float, int]]) -> int:
        """Fold in fraud feedback ``(terminal_id, transaction ts, label)``; returns how many were accepted.

        Feedback for a transaction more than ``label_delay_s`` behind the newest label of its terminal is
        rejected as too late (counted in ``store.stats(builder.label_spec)``).
        """
        rows = []
        for j, (terminal, ts, label) in enumerate(items):
            y = _check_label(label, f"label {j} (terminal_id={terminal!r})")
            if not math.isfinite(float(ts)):
                raise ValueError(f"label {j} (terminal_id={terminal!r}): ts must be finite seconds, got {ts!r}")
            rows.append((float(ts), str(terminal), float(y)))
        rows.sort(key=lambda r: r[0])  # in time order, so a batch never rejects its own members as late
        return self.store.update_many(
            self.label_spec, keys=[r[1] for r in rows], ts=[r[0] for r in rows], values=[r[2] for r in rows]
        )

    def _release_labels(self, *, upto: float) -> None:
        pending = self._pending
        while pending and pending[0][0] <= upto:
            ts, _, terminal, y = heapq.heappop(pending)
            self.store.update(self.label_spec, terminal, ts=ts, value=float(y))

    def _dense(
        self, ts: float, amount: float, card: WindowFeatures, term: WindowFeatures, labels: WindowFeatures
    ) -> list[float]:
        hour_sin, hour_cos = _time_of_day(ts)
        n7, mean7, std7 = card.counts[2], card.means[2], card.stds[2]
        ratio = amount / mean7 if n7 and mean7 > 0 else 1.0
        zscore = (amount - mean7) / (std7 + 1.0) if n7 >= 2 else 0.0
        delayed_tx = _delayed_sum(term.counts, self._term_delayed)
        delayed_labelled = _delayed_sum(labels.counts, self._label_delayed)
        delayed_fraud = round(_delayed_sum(labels.sums, self._label_delayed))
        denom = max(delayed_tx, delayed_labelled)
        return [
            math.log1p(amount),
            hour_sin,
            hour_cos,
            *card.counts[:3],
            *card.sums[:3],
            mean7,
            std7,
            ratio,
            zscore,
            math.log1p(_gap(card, ts, CARD_HISTORY_S)),
            card.distinct[2] if card.distinct else 0,
            *self._term_velocity(term.counts),
            *self._term_velocity(term.sums),
            math.log1p(_gap(term, ts, TERMINAL_GAP_CAP_S)),
            delayed_tx,
            delayed_fraud,
            delayed_fraud / denom if denom else 0.0,
        ]


class _SeqSteps:
    """Collects the history steps of a batch in flat lists, then turns them into features in one numpy pass."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.ts: list[float] = []
        self.amounts: list[float] = []
        self.nexts: list[float] = []
        self.same: list[bool] = []

    def add(self, ts: float, terminal: str, card: WindowFeatures) -> None:
        self.lengths.append(len(card.last_ts))
        if card.last_ts:
            self.ts.extend(card.last_ts)
            self.amounts.extend(card.last_values)
            self.nexts.extend(card.last_ts[1:])
            self.nexts.append(ts)  # the last step's next transaction is the current one
            self.same.extend(map(terminal.__eq__, card.last_distinct or ()))

    def to_arrays(self, history: int) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        seq = np.zeros((len(lengths), history, len(SEQ_FEATURES)), dtype=np.float32)
        if not self.ts:
            return seq, lengths
        t = np.asarray(self.ts)
        angle = 2.0 * np.pi * (t % DAY) / DAY
        values = np.stack(
            [np.log1p(self.amounts), np.log1p(np.asarray(self.nexts) - t), np.sin(angle), np.cos(angle), self.same],
            axis=1,
        )  # (total steps, S)
        starts = np.cumsum(lengths) - lengths
        rows = np.repeat(np.arange(len(lengths)), lengths)
        seq[rows, np.arange(len(t)) - np.repeat(starts, lengths)] = values
        return seq, lengths


def _delayed_index(spec: WindowSpec, delayed: tuple[float, float]) -> tuple[int | None, int]:
    near, far = delayed
    return (spec.windows.index(near) if near > 0 else None), spec.windows.index(far)


def _delayed_sum(col: tuple[float, ...], index: tuple[int | None, int]) -> float:
    """Count (or sum) over ``[t - d - 7d, t - d)``: the (d + 7d)-window minus the d-window."""
    near, far = index
    return col[far] - (col[near] if near is not None else 0)


def _gap(feats: WindowFeatures, ts: float, cap: float) -> float:
    # time_since_last was measured from just before ts; this is from ts itself, capped for keys seen long ago.
    return min(feats.time_since_last + (ts - math.nextafter(ts, -math.inf)), cap)
