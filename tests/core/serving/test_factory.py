"""create_service through TestClient: probes, metrics, request ids, body limits, validation, admin routes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.registry import ModelRegistry
from core.serving import ModelHandle, create_service
from tests.utils.serving_fakes import API_KEY, load_linear, make_service, make_settings, register_linear

FEATURES = {"features": [0.5, -1.0, 2.0, 0.25]}
ADMIN = {"X-API-Key": API_KEY}


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture
def client(registry: ModelRegistry, tmp_path: Path) -> Iterator[TestClient]:
    register_linear(registry, seed=1)
    app, _ = make_service(registry, settings=make_settings(tmp_path, max_body_bytes=300))
    with TestClient(app) as client:
        yield client


def test_readyz_is_503_until_a_model_is_loaded(registry: ModelRegistry, tmp_path: Path) -> None:
    app, handle = make_service(registry, settings=make_settings(tmp_path))
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert "no model named 'toy'" in not_ready.json()["detail"]
        early = client.post("/score", json=FEATURES)
        assert early.status_code == 503 and "not loaded yet" in early.json()["detail"]

        register_linear(registry, seed=1)
        assert client.post("/admin/reload", headers=ADMIN).json() == {
            "reloaded": True,
            "model": "toy@production",
            "version": 1,
        }
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "model": "toy@production", "serving": "toy@1", "version": 1}
    assert not handle.ready  # the lifespan stopped it


def test_score_and_metrics(client: TestClient) -> None:
    for _ in range(3):
        response = client.post("/score", json=FEATURES)
        assert response.status_code == 200 and response.json()["version"] == 1
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'keel_http_requests_total{app="toy",method="POST",route="/score",status="200"} 3.0' in text
    assert 'keel_http_request_duration_seconds_count{app="toy",method="POST",route="/score",status="200"} 3.0' in text
    assert 'keel_batch_size_count{app="toy"} 3.0' in text
    assert 'keel_model_version{app="toy"} 1.0' in text


def test_unmatched_paths_share_one_metrics_label(client: TestClient) -> None:
    for path in ("/nope/1", "/nope/2"):
        assert client.get(path).status_code == 404
    assert 'route="<unmatched>",status="404"} 2.0' in client.get("/metrics").text


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    generated = client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["X-Request-ID"])
    unsafe = client.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["X-Request-ID"])


def test_body_over_the_limit_is_413_by_content_length(client: TestClient) -> None:
    response = client.post("/score", content=b"x" * 301, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"detail": "request body too large: the limit is 300 bytes"}
    assert "X-Request-ID" in response.headers


def test_streamed_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"[" * 50

    response = client.post("/score", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers  # really streamed (chunked)
    assert response.status_code == 413
    assert "limit is 300 bytes" in response.json()["detail"]
    ok = client.post("/score", json=FEATURES)  # the service is unharmed
    assert ok.status_code == 200


def test_bad_input_is_422_naming_the_field(client: TestClient) -> None:
    short = client.post("/score", json={"features": [1.0]})
    assert short.status_code == 422
    assert short.json()["detail"][0]["loc"] == ["body", "features"]
    wrong_type = client.post("/score", json={"features": ["a", 1, 2, 3]})
    assert wrong_type.status_code == 422
    assert wrong_type.json()["detail"][0]["loc"] == ["body", "features", 0]
    not_json = client.post("/score", content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 422


def test_admin_routes_need_the_api_key(client: TestClient) -> None:
    assert client.post("/admin/reload").status_code == 401
    wrong = client.post("/admin/reload", headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["detail"]
    assert client.post("/admin/reload", headers=ADMIN).status_code == 200


def test_admin_routes_are_off_without_a_configured_key(registry: ModelRegistry, tmp_path: Path) -> None:
    register_linear(registry, seed=1)
    app, _ = make_service(registry, settings=make_settings(tmp_path, api_key=None))
    with TestClient(app) as client:
        response = client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 503
    assert "KEEL_API_KEY" in response.json()["detail"]


def test_promote_switches_the_served_model(client: TestClient, registry: ModelRegistry) -> None:
    register_linear(registry, seed=2, aliases=())
    assert client.post("/admin/promote", json={"version": 2}).status_code == 401
    promoted = client.post("/admin/promote", json={"version": 2}, headers=ADMIN)
    assert promoted.status_code == 200
    assert promoted.json() == {"model": "toy", "alias": "production", "version": 2, "reloaded": True}
    assert client.post("/score", json=FEATURES).json()["version"] == 2
    staging = client.post("/admin/promote", json={"version": 1, "alias": "staging"}, headers=ADMIN)
    assert staging.json()["reloaded"] is False and registry.get("toy@staging").version == 1
    assert client.get("/readyz").json()["version"] == 2


def test_promote_refuses_bad_requests(client: TestClient) -> None:
    missing = client.post("/admin/promote", json={"version": 9}, headers=ADMIN)
    assert missing.status_code == 404 and "toy" in missing.json()["detail"]
    bad_alias = client.post("/admin/promote", json={"version": 1, "alias": "no spaces"}, headers=ADMIN)
    assert bad_alias.status_code == 422 and bad_alias.json()["detail"][0]["loc"] == ["body", "alias"]
    reserved = client.post("/admin/promote", json={"version": 1, "alias": "latest"}, headers=ADMIN)
    assert reserved.status_code == 422 and "reserved" in reserved.json()["detail"]
    assert client.post("/admin/promote", json={"version": 0}, headers=ADMIN).status_code == 422


def test_unexpected_error_is_a_json_500_without_trace(registry: ModelRegistry, tmp_path: Path) -> None:
    register_linear(registry, seed=1)
    boom = APIRouter()

    @boom.get("/boom")
    async def explode() -> None:
        raise RuntimeError("secret internals")

    app, _ = make_service(registry, settings=make_settings(tmp_path), routers=(boom,))
    with TestClient(app) as client:
        response = client.get("/boom", headers={"X-Request-ID": "req-1"})
        metrics = client.get("/metrics").text
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error", "request_id": "req-1"}
    assert response.headers["X-Request-ID"] == "req-1"
    assert "secret" not in response.text
    assert 'route="/boom",status="500"} 1.0' in metrics


def test_two_services_keep_separate_metrics(registry: ModelRegistry, tmp_path: Path) -> None:
    register_linear(registry, seed=1)
    apps: list[tuple[FastAPI, ModelHandle]] = [make_service(registry, settings=make_settings(tmp_path)) for _ in "ab"]
    with TestClient(apps[0][0]) as first, TestClient(apps[1][0]) as second:
        first.post("/score", json=FEATURES)
        assert 'route="/score"' in first.get("/metrics").text
        assert 'route="/score"' not in second.get("/metrics").text


class StampMiddleware:
    """A plugin-style middleware: stamps every response."""

    def __init__(self, app: ASGIApp, *, value: str) -> None:
        self.app = app
        self.value = value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Stamp"] = self.value
            await send(message)

        await self.app(scope, receive, stamped)


def test_extra_middleware_runs_inside_the_standard_ones(registry: ModelRegistry, tmp_path: Path) -> None:
    register_linear(registry, seed=1)
    handle = ModelHandle(registry, "toy@production", load=load_linear, reload_interval_s=0)
    app = create_service(
        name="toy",
        handle=handle,
        settings=make_settings(tmp_path),
        middleware=[Middleware(StampMiddleware, value="plugin")],
    )
    with TestClient(app) as client:
        response = client.get("/healthz")
    assert response.headers["X-Stamp"] == "plugin" and "X-Request-ID" in response.headers
