"""Fraud data: ULB/insurance loaders (errors name file, line, column), time split, simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from apps.fraud.data import (
    INSURANCE_LABEL,
    ULB_DENSE_NAMES,
    ULB_FEATURES,
    DataFormatError,
    SimulatorConfig,
    load_insurance,
    load_ulb,
    simulate_transactions,
    time_split,
    ulb_dense_features,
)
from core.config import data_dir


@pytest.fixture(autouse=True, scope="module")
def _single_openmp_thread() -> Iterator[None]:
    # sklearn's gradient boosting spins OpenMP threads that starve each other on a busy 2-core box (5x slower).
    with threadpool_limits(1):
        yield


# large_amount lowered from the handbook's 220 so ~50 customers over 10 days surely show scenario 1.
TINY_SIM = SimulatorConfig(n_customers=50, n_terminals=100, n_days=10, radius=20.0, seed=7, large_amount=150.0)


def _write_ulb(path: Path, rows: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows, len(ULB_FEATURES))), columns=list(ULB_FEATURES))
    frame["Time"] = np.arange(rows) * 10.0
    frame["Amount"] = rng.uniform(1, 100, rows)
    frame["Class"] = np.arange(rows) % 2
    frame.to_csv(path, index=False)
    return frame


def test_load_ulb_reads_a_valid_file(tmp_path: Path) -> None:
    frame = _write_ulb(tmp_path / "ok.csv")
    loaded = load_ulb(tmp_path / "ok.csv")
    assert list(loaded.columns) == [*ULB_FEATURES, "Class"]
    np.testing.assert_allclose(loaded["V3"].to_numpy(), frame["V3"].to_numpy())
    assert loaded["Class"].dtype == np.int64


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    _write_ulb(tmp_path / "f.csv")
    pd.read_csv(tmp_path / "f.csv").drop(columns=["V7"]).to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataFormatError, match=r"f\.csv: line 1 \(header\): missing column\(s\) V7"):
        load_ulb(tmp_path / "f.csv")


def test_non_numeric_value_names_file_line_and_column(tmp_path: Path) -> None:
    _write_ulb(tmp_path / "f.csv")
    lines = (tmp_path / "f.csv").read_text().splitlines()
    cells = lines[3].split(",")  # file line 4 = third data row
    cells[ULB_FEATURES.index("Amount")] = "12;5"
    lines[3] = ",".join(cells)
    (tmp_path / "f.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"f\.csv: line 4, column 'Amount': non-numeric value '12;5'"):
        load_ulb(tmp_path / "f.csv")


def test_empty_value_and_bad_label_are_named(tmp_path: Path) -> None:
    frame = _write_ulb(tmp_path / "f.csv")
    frame.loc[1, "V2"] = np.nan
    frame.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataFormatError, match=r"line 3, column 'V2': an empty value"):
        load_ulb(tmp_path / "f.csv")
    frame = _write_ulb(tmp_path / "g.csv")
    frame["Class"] = frame["Class"].astype(object)
    frame.loc[2, "Class"] = 3
    frame.to_csv(tmp_path / "g.csv", index=False)
    with pytest.raises(DataFormatError, match=r"g\.csv: line 4, column 'Class': label '3'; expected 0 or 1"):
        load_ulb(tmp_path / "g.csv")


def test_label_is_optional_for_scoring(tmp_path: Path) -> None:
    _write_ulb(tmp_path / "f.csv")
    pd.read_csv(tmp_path / "f.csv").drop(columns=["Class"]).to_csv(tmp_path / "f.csv", index=False)
    assert "Class" not in load_ulb(tmp_path / "f.csv", require_label=False).columns
    with pytest.raises(DataFormatError, match="missing column"):
        load_ulb(tmp_path / "f.csv")


def test_dense_features_from_frame_and_items_agree(tmp_path: Path) -> None:
    _write_ulb(tmp_path / "f.csv")
    frame = load_ulb(tmp_path / "f.csv")
    from_frame = ulb_dense_features(frame)
    from_items = ulb_dense_features(frame.drop(columns=["Class"]).to_dict("records"))
    assert from_frame.shape == (5, len(ULB_DENSE_NAMES))
    np.testing.assert_array_equal(from_frame, from_items)
    with pytest.raises(ValueError, match="item 0: missing field 'Amount'"):
        ulb_dense_features([{k: 0.0 for k in ULB_FEATURES if k != "Amount"}])


def test_time_split_trains_on_the_past() -> None:
    frame = pd.DataFrame({"Time": [5, 1, 3, 3, 9, 7, 2, 8, 3, 6], "x": range(10)})
    early, late = time_split(frame, 0.3)
    assert early["Time"].max() < late["Time"].min()
    assert len(early) + len(late) == len(frame)
    with pytest.raises(ValueError, match="frac"):
        time_split(frame, 1.0)


def test_simulator_is_deterministic_and_has_all_scenarios() -> None:
    a = simulate_transactions(TINY_SIM)
    b = simulate_transactions(TINY_SIM)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == ["tx_id", "ts", "card_id", "terminal_id", "amount", "label", "scenario"]
    assert a["ts"].is_monotonic_increasing and a["ts"].max() < TINY_SIM.n_days * 86400
    assert set(a["scenario"].unique()) == {0, 1, 2, 3}
    assert ((a["scenario"] > 0) == (a["label"] == 1)).all()
    assert (a.loc[a["scenario"] == 1, "amount"] > TINY_SIM.large_amount).all()
    other = simulate_transactions(SimulatorConfig(**{**TINY_SIM.__dict__, "seed": 8}))
    assert not a["amount"].equals(other["amount"])


def test_compromised_cards_fraud_is_a_third_of_their_transactions() -> None:
    tx = simulate_transactions(TINY_SIM)
    frauds = tx[tx["scenario"] == 3]
    assert len(frauds) > 0
    # Scenario-3 frauds are the card's own spending x5: far above its legit mean.
    legit_mean = tx[tx["label"] == 0].groupby("card_id")["amount"].mean()
    assert (frauds["amount"].to_numpy() > 2 * legit_mean.reindex(frauds["card_id"]).fillna(0).to_numpy()).mean() > 0.8


@pytest.fixture(scope="module")
def insurance_file() -> Path:
    root = data_dir()
    path = None if root is None else root / "fraud" / "vehicle_insurance_claims_dev.csv"
    if path is None or not path.is_file():
        pytest.skip("real insurance data not found (set KEEL_DATA_DIR)")
    return path


def test_insurance_loader_and_gbdt_baseline(insurance_file: Path) -> None:
    table = load_insurance(insurance_file)
    assert table[INSURANCE_LABEL].sum() == 710 and len(table) == 11337
    early, late = time_split(table, 0.8, time_col="ClaimOrder")
    features = [c for c in table.columns if c not in (INSURANCE_LABEL, "ClaimOrder")]
    clf = HistGradientBoostingClassifier(categorical_features="from_dtype", max_iter=60, random_state=0)
    clf.fit(early[features], early[INSURANCE_LABEL])
    auc = roc_auc_score(late[INSURANCE_LABEL], clf.predict_proba(late[features])[:, 1])
    assert auc > 0.65, auc  # measured 0.694 on the later 20% of claims (a time split is harder than a random one)
