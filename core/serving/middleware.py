"""Cross-cutting HTTP concerns, written once as small pure-ASGI middlewares (after starlette's ``middleware/``).

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming bodies, background tasks and context variables behave, and so
the same classes wrap any ASGI app. Order in a service, outermost first: request id, metrics, error guard, body
limit -- so even a 413 or a 500 carries its request id and is counted.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import TYPE_CHECKING

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from core.serving.metrics import ServiceMetrics

__all__ = [
    "BodySizeLimitMiddleware",
    "ErrorGuardMiddleware",
    "PrometheusMiddleware",
    "REQUEST_ID_HEADER",
    "RequestIdLogFilter",
    "RequestIdMiddleware",
    "request_id_var",
]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# Only ids that are safe to echo into a header and a log line are kept; anything else is replaced.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

request_id_var: ContextVar[str | None] = ContextVar("keel_request_id", default=None)


class RequestIdLogFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) so a log format can show ``%(request_id)s``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


async def _send_json(send: Send, *, status: int, body: dict[str, object]) -> None:
    """Sends a complete JSON response straight to an ASGI ``send``."""
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class RequestIdMiddleware:
    """Echoes the client's ``X-Request-ID`` (when well-formed) or generates one; visible to handlers and logs.

    The id is stored in ``request.state.request_id`` and in :data:`request_id_var`, and set on the response.
    """

    def __init__(self, app: ASGIApp, *, header: str = REQUEST_ID_HEADER) -> None:
        self.app = app
        self.header = header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        # An enclosing gateway already chose the id: keep it, so both layers log and return the same one.
        request_id = state.get("request_id") or self._choose_id(scope)
        state["request_id"] = request_id
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[self.header] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)

    def _choose_id(self, scope: Scope) -> str:
        incoming = Headers(scope=scope).get(self.header)
        return incoming if incoming and _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the limit."""


class BodySizeLimitMiddleware:
    """Answers 413 (JSON) to bodies over ``max_bytes``: by ``Content-Length`` up front, or while streaming.

    A chunked body is counted as it arrives; when it passes the limit the app's ``receive`` raises, whatever the
    app does next is dropped, and the client gets the 413.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> dict[str, object]:
        return {"detail": f"request body too large: the limit is {self.max_bytes} bytes"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, status=400, body={"detail": f"invalid Content-Length header: {declared!r}"})
                return
            if int(declared) > self.max_bytes:
                await _send_json(send, status=413, body=self._too_large())
                return
        await self._guard_stream(scope, receive, send)

    async def _guard_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # the app's own reaction to the failed read (often a 400) is replaced by the 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _send_json(send, status=413, body=self._too_large())


class ErrorGuardMiddleware:
    """Turns an unexpected exception into a JSON 500 without a stack trace (the trace goes to the log).

    Starlette's own server-error handler answers outside every user middleware and then re-raises; this guard sits
    inside them, so the 500 still gets a request id and is counted by the metrics.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            request_id = request_id_var.get()
            log.exception("unhandled error in %s %s (request id %s)", scope["method"], scope["path"], request_id)
            if started:
                raise
            body: dict[str, object] = {"detail": "internal server error", "request_id": request_id}
            await _send_json(send, status=500, body=body)


class PrometheusMiddleware:
    """Counts requests and times them, labelled by app, route template (``/items/{id}``, not the raw path),
    method and status. Unmatched paths share one ``<unmatched>`` label so scanners cannot blow up cardinality.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or "<unmatched>"
            self.metrics.observe_request(
                route=template, method=scope["method"], status=status, seconds=time.perf_counter() - start
            )
