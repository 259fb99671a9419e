"""Fraud data: the real ULB card sample, the real vehicle-insurance claims, and a transaction simulator.

The simulator follows the design of "Reproducible Machine Learning for Credit Card Fraud Detection -
Practical Handbook" (Le Borgne, Siblini, Lebichot, Bontempi; ULB MLG, 2022), chapter 3.2: customers
and terminals on a 100x100 grid, customers use terminals within a radius, daily Poisson transactions,
and three fraud scenarios (large amounts, compromised terminals, compromised cards).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "ULB_FEATURES",
    "ULB_LABEL",
    "INSURANCE_LABEL",
    "DataFormatError",
    "ULB_DENSE_NAMES",
    "load_ulb",
    "ulb_dense_features",
    "load_insurance",
    "time_split",
    "SimulatorConfig",
    "simulate_transactions",
]

ULB_FEATURES: tuple[str, ...] = ("Time", *(f"V{i}" for i in range(1, 29)), "Amount")
ULB_LABEL = "Class"
INSURANCE_LABEL = "FraudFound_P"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message names the file, line and column."""


def _check_columns(frame: pd.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataFormatError(
            f"{path}: line 1 (header): missing column(s) {', '.join(missing)}; "
            f"expected {', '.join(required)}; found {', '.join(map(str, frame.columns))}"
        )


def _to_numeric(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """Converts ``columns`` to float64, naming the first bad or empty cell (file line = row + 2)."""
    out = {}
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() | ~np.isfinite(values.to_numpy(dtype=np.float64)))
        if bad.size:
            row = int(bad[0])
            raw = frame[col].iloc[row]
            what = "an empty value" if pd.isna(raw) or str(raw).strip() == "" else f"non-numeric value {raw!r}"
            raise DataFormatError(f"{path}: line {row + 2}, column {col!r}: {what}; expected a finite number")
        out[col] = values.to_numpy(dtype=np.float64)
    return pd.DataFrame(out, index=frame.index)


def load_ulb(path: str | Path, *, require_label: bool = True) -> pd.DataFrame:
    """Loads a CSV in the ULB credit-card format (Time, V1..V28, Amount and optionally Class).

    Args:
        path: the CSV file.
        require_label: raise when the ``Class`` column is absent (pass False to score unlabelled data).

    Returns:
        A float64 frame with the feature columns (and ``Class`` as int64 when present), in file order.

    Raises:
        DataFormatError: a missing column, an empty or non-numeric value, or a label other than 0/1;
            the message names the file, the line and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ULB-format CSV: {path}")
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    required = (*ULB_FEATURES, ULB_LABEL) if require_label else ULB_FEATURES
    _check_columns(raw, path, required)
    has_label = ULB_LABEL in raw.columns
    frame = _to_numeric(raw, path, (*ULB_FEATURES, ULB_LABEL) if has_label else ULB_FEATURES)
    if has_label:
        bad = np.flatnonzero(~np.isin(frame[ULB_LABEL].to_numpy(), (0.0, 1.0)))
        if bad.size:
            row = int(bad[0])
            raise DataFormatError(
                f"{path}: line {row + 2}, column {ULB_LABEL!r}: label {raw[ULB_LABEL].iloc[row]!r}; expected 0 or 1"
            )
        frame[ULB_LABEL] = frame[ULB_LABEL].astype(np.int64)
    return frame


ULB_DENSE_NAMES: tuple[str, ...] = (*(f"V{i}" for i in range(1, 29)), "log_amount", "hour_sin", "hour_cos")


def ulb_dense_features(rows: pd.DataFrame | list[dict[str, Any]]) -> np.ndarray:
    """Per-transaction model inputs from ULB-format rows: V1..V28, log(1 + Amount), hour of day on a circle.

    Raw ``Time`` is not an input: it only grows, so a model would see test times never seen in
    training; its hour of day (the sample starts at midnight) carries the useful part.

    Args:
        rows: a frame from :func:`load_ulb` or a list of dicts with keys Time, V1..V28, Amount.

    Returns:
        (B, 31) float32, columns as in :data:`ULB_DENSE_NAMES`.
    """
    if isinstance(rows, pd.DataFrame):
        values = rows.loc[:, list(ULB_FEATURES)].to_numpy(dtype=np.float64)
    else:
        values = np.empty((len(rows), len(ULB_FEATURES)), dtype=np.float64)
        for i, item in enumerate(rows):
            try:
                values[i] = [item[k] for k in ULB_FEATURES]
            except KeyError as err:
                raise ValueError(
                    f"item {i}: missing field {err.args[0]!r}; expected {', '.join(ULB_FEATURES)}"
                ) from None
            except (TypeError, ValueError):
                raise ValueError(f"item {i}: every field of {', '.join(ULB_FEATURES)} must be a number") from None
    angle = (values[:, 0] % 86400.0) / 86400.0 * 2 * np.pi
    amount = np.log1p(np.clip(values[:, -1], 0.0, None))
    return np.column_stack([values[:, 1:29], amount, np.sin(angle), np.cos(angle)]).astype(np.float32)


def load_insurance(path: str | Path) -> pd.DataFrame:
    """Loads the vehicle-insurance claims table with its string columns as sorted categoricals.

    Args:
        path: the CSV (label column ``FraudFound_P``).

    Returns:
        The table minus ``PolicyNumber`` (a row id), with string columns as ``category`` dtype (sorted
        categories, so codes are stable) and an added ``ClaimOrder`` (year, claim month, claim week)
        for :func:`time_split` with ``time_col="ClaimOrder"``; sorted by it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such insurance CSV: {path}")
    raw = pd.read_csv(path)
    _check_columns(raw, path, (INSURANCE_LABEL, "Year", "MonthClaimed", "WeekOfMonthClaimed"))
    month = raw["MonthClaimed"].map({m: i for i, m in enumerate(_MONTHS)}).fillna(-1)
    raw["ClaimOrder"] = raw["Year"] * 100 + month * 6 + raw["WeekOfMonthClaimed"]
    raw = raw.drop(columns=["PolicyNumber"], errors="ignore").sort_values("ClaimOrder", kind="stable")
    for col in raw.columns:
        if not pd.api.types.is_numeric_dtype(raw[col]):
            raw[col] = pd.Categorical(raw[col], categories=sorted(raw[col].astype(str).unique()))
    return raw.reset_index(drop=True)


def time_split(frame: pd.DataFrame, frac: float = 0.8, *, time_col: str = "Time") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits into earlier / later parts: train on the past, test on the future.

    The cut is a time value (the ``frac`` quantile by row count), so rows sharing a timestamp never
    straddle the two parts and every training row is strictly earlier than every test row.

    Returns:
        ``(earlier, later)``, each sorted by time (stable).
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    ordered = frame.sort_values(time_col, kind="stable")
    cut = ordered[time_col].iloc[int(len(ordered) * frac)]
    return ordered[ordered[time_col] < cut], ordered[ordered[time_col] >= cut]


@dataclass(frozen=True)
class SimulatorConfig:
    """Size and fraud settings of the transaction simulator (handbook defaults, smaller sizes)."""

    n_customers: int = 500
    n_terminals: int = 1000
    n_days: int = 60
    radius: float = 5.0
    seed: int = 0
    compromised_terminals_per_day: int = 2
    terminal_fraud_days: int = 28
    compromised_cards_per_day: int = 3
    card_fraud_days: int = 14
    large_amount: float = 220.0


def _customers(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    mean = rng.uniform(5, 100, n)
    return {"xy": rng.uniform(0, 100, (n, 2)), "mean": mean, "std": mean / 2, "per_day": rng.uniform(0, 4, n)}


def _nearby_terminals(customer_xy: np.ndarray, terminal_xy: np.ndarray, radius: float) -> list[np.ndarray]:
    dist = np.sqrt(((customer_xy[:, None, :] - terminal_xy[None, :, :]) ** 2).sum(-1))  # (C, T)
    return [np.flatnonzero(row < radius) for row in dist]


def _legit_transactions(rng: np.random.Generator, cfg: SimulatorConfig) -> pd.DataFrame:
    cust = _customers(rng, cfg.n_customers)
    nearby = _nearby_terminals(cust["xy"], rng.uniform(0, 100, (cfg.n_terminals, 2)), cfg.radius)
    rows: list[tuple[int, int, int, float]] = []
    for c in range(cfg.n_customers):
        if nearby[c].size == 0:  # a customer with no terminal in reach never pays by card
            continue
        counts = rng.poisson(cust["per_day"][c], cfg.n_days)
        for day in np.flatnonzero(counts):
            secs = rng.normal(43200, 20000, counts[day]).astype(np.int64)
            for s in secs[(secs > 0) & (secs < 86400)]:
                amount = rng.normal(cust["mean"][c], cust["std"][c])
                amount = rng.uniform(0, cust["mean"][c] * 2) if amount < 0 else amount
                rows.append((int(day) * 86400 + int(s), c, int(rng.choice(nearby[c])), round(float(amount), 2)))
    frame = pd.DataFrame(rows, columns=["ts", "card_id", "terminal_id", "amount"])
    return frame.sort_values(["ts", "card_id"], kind="stable").reset_index(drop=True)


def _inject_frauds(rng: np.random.Generator, tx: pd.DataFrame, cfg: SimulatorConfig) -> None:
    """Adds ``label``/``scenario`` in place; later scenarios overwrite earlier ones, as in the handbook."""
    tx["label"] = 0
    tx["scenario"] = 0
    big = tx["amount"].to_numpy() > cfg.large_amount
    tx.loc[big, ["label", "scenario"]] = [1, 1]
    day = tx["ts"].to_numpy() // 86400
    for d in range(cfg.n_days):
        terms = rng.choice(cfg.n_terminals, size=cfg.compromised_terminals_per_day, replace=False)
        hit = np.isin(tx["terminal_id"].to_numpy(), terms) & (day >= d) & (day < d + cfg.terminal_fraud_days)
        tx.loc[hit, ["label", "scenario"]] = [1, 2]
    for d in range(cfg.n_days):
        cards = rng.choice(cfg.n_customers, size=cfg.compromised_cards_per_day, replace=False)
        window = np.flatnonzero(np.isin(tx["card_id"].to_numpy(), cards) & (day >= d) & (day < d + cfg.card_fraud_days))
        picked = rng.choice(window, size=len(window) // 3, replace=False) if window.size >= 3 else window[:0]
        tx.loc[picked, "amount"] = (tx.loc[picked, "amount"] * 5).round(2)
        tx.loc[picked, ["label", "scenario"]] = [1, 3]


def simulate_transactions(cfg: SimulatorConfig = SimulatorConfig()) -> pd.DataFrame:
    """Simulates card transactions with the three fraud scenarios; deterministic given ``cfg.seed``.

    Returns:
        Columns ``tx_id, ts (seconds from day 0), card_id, terminal_id, amount, label, scenario``
        (scenario 0 legit, 1 amount > 220, 2 compromised terminal, 3 compromised card), sorted by ``ts``.
    """
    if cfg.n_customers < cfg.compromised_cards_per_day or cfg.n_terminals < cfg.compromised_terminals_per_day:
        raise ValueError("the simulator needs more customers/terminals than it compromises per day")
    rng = np.random.default_rng(cfg.seed)
    tx = _legit_transactions(rng, cfg)
    _inject_frauds(rng, tx, cfg)
    tx.insert(0, "tx_id", np.arange(len(tx), dtype=np.int64))
    return tx
