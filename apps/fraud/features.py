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
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core.features import FeatureStore, MemoryFeatureStore, WindowBatch, WindowSpec, create_store

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


def _time_of_day(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    angle = 2.0 * np.pi * (ts % DAY) / DAY
    return np.sin(angle), np.cos(angle)


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
        self._term_velocity = [term_windows.index(w) for w in velocity]  # picks 1h, 1d, 7d
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
        parsed = [_parse(tx, i) for i, tx in enumerate(txns)]
        ts, cards, terminals, amounts, labels = (list(col) for col in zip(*parsed, strict=True)) if parsed else [[]] * 5
        # One columnar pass per spec (card and terminal state are independent, so spec by spec equals event by
        # event): each row reads its key strictly before its ts, then folds its own event in.
        card = self.store.read_before(self.card_spec, keys=cards, ts=ts, values=amounts, distinct=terminals)
        term = self.store.read_before(self.terminal_spec, keys=terminals, ts=ts, values=amounts)
        known = self._label_features(ts, terminals, labels)
        t = np.asarray(ts, dtype=np.float64)
        dense = self._dense(t, np.asarray(amounts, dtype=np.float64), card, term, known)
        seq, lengths = _sequences(t, terminals, card, self.history)
        return dense, seq, lengths

    def _label_features(self, ts: list[float], terminals: list[str], labels: list[int | None]) -> WindowBatch:
        """The label windows of each transaction's terminal, with exactly the labels known at its time.

        Reads are batched over runs of transactions spanning at most half the label delay. Before a run, every
        pending label older than ``run end - delay`` is released. That can release labels a transaction early
        in the run would not have seen yet, but those lie within ``delay`` of its time, where they fall in both
        the ``delay`` and the ``delay + 7d`` window and cancel in the delayed counts and sums; labels of the run
        itself are queued only after its reads. So every read equals the event-by-event replay's.
        """
        n, half = len(ts), self.label_delay_s / 2
        batches, start = [], 0
        while start < n:
            lo = hi = ts[start]
            stop = start + 1
            while stop < n and max(hi, ts[stop]) - min(lo, ts[stop]) <= half:
                lo, hi = min(lo, ts[stop]), max(hi, ts[stop])
                stop += 1
            if self._pending and self._pending[0][0] <= hi - self.label_delay_s:
                self._release_labels(upto=hi - self.label_delay_s)
            batches.append(self.store.read_before(self.label_spec, keys=terminals[start:stop], ts=ts[start:stop]))
            for i in range(start, stop):
                y = labels[i]
                if y is not None:
                    heapq.heappush(self._pending, (ts[i], self._pending_seq, terminals[i], y))
                    self._pending_seq += 1
            start = stop
        if len(batches) == 1:
            return batches[0]
        return _concat(batches) if batches else self.store.read_before(self.label_spec, keys=[], ts=[])

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

    def state_dict(self) -> dict[str, np.ndarray]:
        """The builder's whole state (feature store + labels not yet released) as numpy arrays, no pickles.

        Raises:
            TypeError: the store is not a :class:`core.features.MemoryFeatureStore` (a redis store keeps its
                state in redis, which is its own durable copy).
        """
        if not isinstance(self.store, MemoryFeatureStore):
            raise TypeError(f"only a memory feature store is saved with the builder, not {type(self.store).__name__}")
        pending = sorted(self._pending)
        meta = {"config": self._config(), "pending_seq": self._pending_seq, "terminals": [p[2] for p in pending]}
        return {
            **{f"store.{k}": v for k, v in self.store.state_dict().items()},
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "pending.ts": np.array([p[0] for p in pending], dtype=np.float64),
            "pending.seq": np.array([p[1] for p in pending], dtype=np.int64),
            "pending.label": np.array([p[3] for p in pending], dtype=np.int64),
        }

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Continues from a :meth:`state_dict` of a builder with the same settings (else a ValueError)."""
        meta = json.loads(bytes(np.asarray(state["meta"], dtype=np.uint8)))
        if meta["config"] != self._config():
            raise ValueError(f"builder state was saved with {meta['config']}, this builder has {self._config()}")
        if not isinstance(self.store, MemoryFeatureStore):
            raise TypeError(f"builder state loads into a memory feature store, not {type(self.store).__name__}")
        self.store.load_state_dict({k[len("store.") :]: v for k, v in state.items() if k.startswith("store.")})
        ts, seq, labels = (state[f"pending.{k}"].tolist() for k in ("ts", "seq", "label"))
        self._pending = list(zip(ts, seq, meta["terminals"], labels, strict=True))  # sorted: a valid heap
        self._pending_seq = int(meta["pending_seq"])

    def _config(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "label_delay_s": self.label_delay_s,
            "allowed_lateness_s": self.card_spec.allowed_lateness,
        }

    def _release_labels(self, *, upto: float) -> None:
        pending, ts, terminals, labels = self._pending, [], [], []
        while pending and pending[0][0] <= upto:
            t, _, terminal, y = heapq.heappop(pending)
            ts.append(t)
            terminals.append(terminal)
            labels.append(float(y))
        self.store.update_many(self.label_spec, keys=terminals, ts=ts, values=labels)

    def _dense(
        self, ts: np.ndarray, amount: np.ndarray, card: WindowBatch, term: WindowBatch, labels: WindowBatch
    ) -> np.ndarray:
        hour_sin, hour_cos = _time_of_day(ts)
        n7, mean7, std7 = card.counts[:, 2], card.means[:, 2], card.stds[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where((n7 > 0) & (mean7 > 0), amount / mean7, 1.0)
            zscore = np.where(n7 >= 2, (amount - mean7) / (std7 + 1.0), 0.0)
            delayed_tx = _delayed_sum(term.counts, self._term_delayed)
            delayed_labelled = _delayed_sum(labels.counts, self._label_delayed)
            delayed_fraud = np.round(_delayed_sum(labels.sums, self._label_delayed))
            denom = np.maximum(delayed_tx, delayed_labelled)
            risk = np.where(denom > 0, delayed_fraud / denom, 0.0)
        assert card.distinct is not None  # the card spec tracks distinct terminals
        columns = [
            np.log1p(amount),
            hour_sin,
            hour_cos,
            *card.counts[:, :3].T,
            *card.sums[:, :3].T,
            mean7,
            std7,
            ratio,
            zscore,
            np.log1p(_gap(card, ts, CARD_HISTORY_S)),
            card.distinct[:, 2],
            *term.counts[:, self._term_velocity].T,
            *term.sums[:, self._term_velocity].T,
            np.log1p(_gap(term, ts, TERMINAL_GAP_CAP_S)),
            delayed_tx,
            delayed_fraud,
            risk,
        ]
        return np.stack(columns, axis=1).astype(np.float32).reshape(len(ts), len(FEATURE_NAMES))


def _sequences(ts: np.ndarray, terminals: list[str], card: WindowBatch, history: int) -> tuple[np.ndarray, np.ndarray]:
    """The card's last ``history`` transactions before each one, as zero-padded steps (see the module docstring)."""
    lengths = card.last_lengths
    seq = np.zeros((len(lengths), history, len(SEQ_FEATURES)), dtype=np.float32)
    if not len(card.last_ts):
        return seq, lengths
    t = card.last_ts
    nexts = np.empty_like(t)
    nexts[:-1] = t[1:]
    has = lengths > 0
    nexts[np.cumsum(lengths)[has] - 1] = ts[has]  # the last step's next transaction is the current one
    # object arrays: str equality without converting every id to a fixed-width unicode array first
    own = np.repeat(np.asarray(terminals, dtype=object), lengths)
    same = (np.asarray(card.last_distinct, dtype=object) == own).astype(np.float64)
    angle = 2.0 * np.pi * (t % DAY) / DAY
    values = np.stack(
        [np.log1p(card.last_values), np.log1p(nexts - t), np.sin(angle), np.cos(angle), same], axis=1
    )  # (total steps, S)
    starts = np.cumsum(lengths) - lengths
    rows = np.repeat(np.arange(len(lengths)), lengths)
    seq[rows, np.arange(len(t)) - np.repeat(starts, lengths)] = values
    return seq, lengths


def _concat(batches: list[WindowBatch]) -> WindowBatch:
    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(b, name) for b in batches])

    distinct = None if batches[0].distinct is None else cat("distinct")
    last_distinct = None if batches[0].last_distinct is None else [d for b in batches for d in b.last_distinct or ()]
    return WindowBatch(
        counts=cat("counts"),
        sums=cat("sums"),
        means=cat("means"),
        stds=cat("stds"),
        distinct=distinct,
        time_since_last=cat("time_since_last"),
        last_lengths=cat("last_lengths"),
        last_ts=cat("last_ts"),
        last_values=cat("last_values"),
        last_distinct=last_distinct,
    )


def _delayed_index(spec: WindowSpec, delayed: tuple[float, float]) -> tuple[int | None, int]:
    near, far = delayed
    return (spec.windows.index(near) if near > 0 else None), spec.windows.index(far)


def _delayed_sum(col: np.ndarray, index: tuple[int | None, int]) -> np.ndarray:
    """Count (or sum) over ``[t - d - 7d, t - d)``: the (d + 7d)-window minus the d-window; ``col`` is (B, W)."""
    near, far = index
    return col[:, far] - (col[:, near] if near is not None else 0)


def _gap(feats: WindowBatch, ts: np.ndarray, cap: float) -> np.ndarray:
    # time_since_last was measured from just before ts; this is from ts itself, capped for keys seen long ago.
    return np.minimum(feats.time_since_last + (ts - np.nextafter(ts, -np.inf)), cap)
