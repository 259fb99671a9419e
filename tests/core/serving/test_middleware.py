"""The pure-ASGI middlewares on a bare Starlette app (no model): body limit edge cases, request-id logging."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from core.serving.middleware import BodySizeLimitMiddleware, RequestIdLogFilter, RequestIdMiddleware

log = logging.getLogger("tests.serving.echo")


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    log.warning("echoing %d bytes", len(body))
    return JSONResponse({"size": len(body)})


def make_app() -> Starlette:
    return Starlette(
        routes=[Route("/echo", echo, methods=["POST"])],
        middleware=[Middleware(RequestIdMiddleware), Middleware(BodySizeLimitMiddleware, max_bytes=10)],
    )


def test_bodies_at_the_limit_pass_and_bigger_ones_do_not() -> None:
    with TestClient(make_app()) as client:
        assert client.post("/echo", content=b"x" * 10).json() == {"size": 10}
        assert client.post("/echo", content=b"x" * 11).status_code == 413
        assert client.post("/echo", content=iter([b"x" * 6, b"x" * 6])).status_code == 413


def test_a_malformed_content_length_is_400() -> None:
    with TestClient(make_app()) as client:
        response = client.post("/echo", content=b"x", headers={"content-length": "ten"})
    assert response.status_code == 400
    assert "Content-Length" in response.json()["detail"]


def test_log_records_carry_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    handler_filter = RequestIdLogFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        with TestClient(make_app()) as client, caplog.at_level(logging.WARNING, logger=log.name):
            client.post("/echo", content=b"abc", headers={"X-Request-ID": "trace-42"})
    finally:
        caplog.handler.removeFilter(handler_filter)
    [record] = [r for r in caplog.records if r.name == log.name]
    assert record.request_id == "trace-42"  # type: ignore[attr-defined]


def test_a_zero_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        BodySizeLimitMiddleware(make_app(), max_bytes=0)
