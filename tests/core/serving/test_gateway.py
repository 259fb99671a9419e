"""The gateway: mounting, sub-app lifespans, landing page, and real HTTP through uvicorn."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient

from core.registry import ModelRegistry
from core.serving import ModelHandle, build_gateway
from tests.utils.serving_fakes import make_service, make_settings, register_linear

FEATURES = {"features": [0.5, -1.0, 2.0, 0.25]}
PAGE = "<!doctype html><title>beta ui</title><p>score a transaction</p>"


@pytest.fixture
def services(tmp_path: Path) -> dict[str, tuple[FastAPI, ModelHandle]]:
    registry = ModelRegistry(tmp_path / "registry")
    out = {}
    for seed, name in enumerate(("alpha", "beta")):
        register_linear(registry, name, seed=seed)
        out[name] = make_service(
            registry, name=name, settings=make_settings(tmp_path, max_delay_ms=200, reload_interval_s=0.05)
        )
    return out


def test_gateway_runs_every_sub_app_lifespan(services: dict[str, tuple[FastAPI, ModelHandle]]) -> None:
    gateway = build_gateway({name: app for name, (app, _) in services.items()})
    handles = [handle for _, handle in services.values()]
    with TestClient(gateway) as client:
        assert all(h.ready for h in handles)
        for name in services:
            ready = client.get(f"/{name}/readyz")
            assert ready.status_code == 200 and ready.json()["serving"] == f"{name}@1"
            assert client.post(f"/{name}/score", json=FEATURES).json()["version"] == 1
        assert client.get("/healthz").json() == {"status": "ok", "apps": ["alpha", "beta"]}
    assert not any(h.ready for h in handles)  # and their shutdown ran too


def test_landing_page_links_docs_and_pages(services: dict[str, tuple[FastAPI, ModelHandle]]) -> None:
    gateway = build_gateway({name: app for name, (app, _) in services.items()}, title="Keel demo", pages={"beta": PAGE})
    with TestClient(gateway) as client:
        landing = client.get("/")
        assert landing.status_code == 200 and landing.headers["content-type"].startswith("text/html")
        for link in ('href="/alpha/docs"', 'href="/beta/docs"', 'href="/beta/ui"', "Keel demo", "alpha scorer"):
            assert link in landing.text
        assert 'href="/alpha/ui"' not in landing.text
        assert client.get("/beta/ui").text == PAGE
        docs = client.get("/alpha/docs")
        assert docs.status_code == 200 and "/alpha/openapi.json" in docs.text
        assert client.get("/alpha/openapi.json").json()["info"]["title"] == "alpha"


def test_request_id_is_the_same_through_the_gateway(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    register_linear(registry, "alpha")
    echo = APIRouter()

    @echo.get("/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        return {"request_id": request.state.request_id}

    app, _ = make_service(registry, name="alpha", settings=make_settings(tmp_path), routers=(echo,))
    with TestClient(build_gateway({"alpha": app})) as client:
        response = client.get("/alpha/whoami")
    assert response.headers.get_list("X-Request-ID") == [response.json()["request_id"]]


@pytest.mark.parametrize(
    ("names", "pages", "message"),
    [
        (["Bad Name"], {}, "cannot be a URL prefix"),
        (["healthz"], {}, "clashes with a gateway route"),
        (["alpha"], {"gamma": PAGE}, "not mounted"),
    ],
)
def test_bad_gateway_config_is_refused(names: list[str], pages: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_gateway(dict.fromkeys(names, FastAPI()), pages=pages)


@pytest.fixture
def live_gateway(services: dict[str, tuple[FastAPI, ModelHandle]]) -> Iterator[str]:
    """The gateway served by a real uvicorn on a free loopback port, in a background thread."""
    gateway = build_gateway({name: app for name, (app, _) in services.items()})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # ws="none": no websocket library is imported, so none of its deprecation warnings can fire in the thread.
    server = uvicorn.Server(uvicorn.Config(gateway, log_level="warning", ws="none", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_real_http_batches_concurrent_requests(
    live_gateway: str, services: dict[str, tuple[FastAPI, ModelHandle]]
) -> None:
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live_gateway, timeout=30) as client:
            return await asyncio.gather(*(client.post("/alpha/score", json=FEATURES) for _ in range(24)))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 24
    assert len({r.headers["X-Request-ID"] for r in responses}) == 24
    stats = services["alpha"][1].batch_stats
    assert stats.items == 24
    assert stats.max_size > 1  # concurrent HTTP requests shared model calls
    with httpx.Client(base_url=live_gateway) as client:
        assert client.get("/beta/readyz").status_code == 200
        assert 'keel_batch_size_count{app="alpha"}' in client.get("/alpha/metrics").text


def test_real_http_hot_reload_loses_no_request(
    live_gateway: str, services: dict[str, tuple[FastAPI, ModelHandle]]
) -> None:
    handle = services["beta"][1]

    async def main() -> list[httpx.Response]:
        responses: list[httpx.Response] = []
        stop = asyncio.Event()

        async def until(predicate: Callable[[], bool]) -> None:
            async with asyncio.timeout(30):  # only stops a broken test from hanging
                while not predicate():
                    await asyncio.sleep(0.01)

        async with httpx.AsyncClient(base_url=live_gateway, timeout=30) as client:

            async def user() -> None:
                while not stop.is_set():
                    responses.append(await client.post("/beta/score", json=FEATURES))

            users = [asyncio.create_task(user()) for _ in range(4)]
            await until(lambda: len(responses) > 10)
            await asyncio.to_thread(register_linear, handle.registry, "beta", seed=7)  # production -> v2
            await until(lambda: handle.version == 2)
            seen = len(responses)
            await until(lambda: len(responses) > seen + 10)
            stop.set()
            await asyncio.gather(*users)
        return responses

    responses = asyncio.run(main())
    assert {r.status_code for r in responses} == {200}
    versions = [r.json()["version"] for r in responses]
    assert set(versions) == {1, 2} and versions[-1] == 2
