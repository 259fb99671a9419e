"""``POST /v1/score`` through the real service factory, standalone and behind the gateway."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from apps.fraud.app import APP
from apps.fraud.service import create_app
from apps.fraud.train import FraudTrainConfig, main
from core.serving import ServingSettings, build_gateway
from tests.utils.fraud import TINY, synthetic_ulb


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fraud_service")
    main(FraudTrainConfig(data_path=str(synthetic_ulb(folder / "dev.csv")), registry_root=str(folder / "reg"), **TINY))
    return folder / "reg"


@pytest.fixture
def client(registry_root: Path) -> Iterator[TestClient]:
    settings = ServingSettings(registry_root=registry_root, reload_interval_s=0, max_delay_ms=1)
    with TestClient(create_app(settings)) as c:
        yield c


def _txn(**overrides: float) -> dict[str, float]:
    body = {"Time": 1000.0, "Amount": 12.5, **{f"V{i}": 0.1 * i for i in range(1, 29)}}
    body.update(overrides)
    return body


def test_score_returns_a_calibrated_decision_with_reasons(client: TestClient) -> None:
    r = client.post("/v1/score", json=_txn())
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0.0 <= body["score"] <= 1.0 and 0.0 < body["threshold"] < 1.0
    assert body["decision"] == ("fraud" if body["score"] >= body["threshold"] else "legit")
    assert body["model"] == "fraud@1" and 1 <= len(body["top_reasons"]) <= 3
    assert all(math.isfinite(x["contribution"]) for x in body["top_reasons"])


def test_a_fraud_like_transaction_scores_higher(client: TestClient) -> None:
    plain = client.post("/v1/score", json=_txn()).json()["score"]
    odd = client.post("/v1/score", json=_txn(V14=-6.0, V17=-4.0, Amount=400.0)).json()["score"]
    assert odd > plain


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({k: v for k, v in _txn().items() if k != "V3"}, "V3"),
        (_txn(Amount=-5.0), "Amount"),
        ({**_txn(), "V7": "high"}, "V7"),
        ({**_txn(), "Amoutn": 3.0}, "Amoutn"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/v1/score", json=body)
    assert r.status_code == 422
    assert any(field in map(str, err["loc"]) for err in r.json()["detail"]), r.json()


def test_non_finite_numbers_are_refused(client: TestClient) -> None:
    raw = '{"Time": 1, "Amount": NaN, ' + ", ".join(f'"V{i}": 0' for i in range(1, 29)) + "}"
    r = client.post("/v1/score", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422


def test_gateway_serves_the_page_and_scores_under_the_prefix(registry_root: Path) -> None:
    settings = ServingSettings(registry_root=registry_root, reload_interval_s=0)
    gateway = build_gateway({"fraud": create_app(settings)}, pages={"fraud": APP.page or ""})
    with TestClient(gateway) as c:
        assert "fraud" in c.get("/").text
        page = c.get("/fraud/ui")
        assert page.status_code == 200 and 'fetch("v1/score"' in page.text
        assert c.post("/fraud/v1/score", json=_txn()).status_code == 200
        assert c.get("/fraud/readyz").json()["serving"] == "fraud@1"
