"""One front door for several services: each mounted under ``/<name>``, plus a landing page and ``/healthz``.

Starlette does not run the lifespan of a mounted app, so the gateway's own lifespan enters every sub-app's lifespan
itself (in order, and leaves them in reverse): each model is loaded before the gateway takes traffic.
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from core.serving.middleware import RequestIdMiddleware

__all__ = ["build_gateway"]

_APP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_RESERVED = frozenset({"healthz", "docs", "redoc", "openapi.json", "static"})


def _check_names(apps: Mapping[str, FastAPI], pages: Mapping[str, str]) -> None:
    for name in apps:
        if not _APP_NAME.match(name):
            raise ValueError(f"app name {name!r} cannot be a URL prefix: use lowercase letters, digits, '_' or '-'")
        if name in _RESERVED:
            raise ValueError(f"app name {name!r} clashes with a gateway route; reserved: {sorted(_RESERVED)}")
    unknown = sorted(set(pages) - set(apps))
    if unknown:
        raise ValueError(f"pages given for apps that are not mounted: {unknown}; mounted: {sorted(apps)}")


def _landing_page(title: str, apps: Mapping[str, FastAPI], pages: Mapping[str, str]) -> str:
    rows = []
    for name, app in apps.items():
        summary = html.escape(app.summary or app.description or "")
        links = [f'<a href="/{name}/docs">API docs</a>']
        if name in pages:
            links.insert(0, f'<a href="/{name}/ui">try it</a>')
        rows.append(f"<li><b>{html.escape(name)}</b> {summary}<br>{' &middot; '.join(links)}</li>")
    title = html.escape(title)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem}"
        "li{margin:.8rem 0}</style></head>"
        f"<body><h1>{title}</h1><ul>{''.join(rows)}</ul><p><a href='/healthz'>health</a></p></body></html>"
    )


def build_gateway(
    apps: Mapping[str, FastAPI],
    *,
    title: str = "Keel",
    pages: Mapping[str, str] | None = None,
) -> FastAPI:
    """Mounts each service under ``/<name>``.

    Args:
        apps: services by name (the URL prefix), e.g. ``{"fraud": fraud_app}``.
        title: heading of the landing page.
        pages: optional HTML of an app's small interactive page, served at ``/<name>/ui``.

    Returns:
        A FastAPI app serving ``/`` (landing page), ``/healthz`` and every mounted service.

    Raises:
        ValueError: an app name is not a clean URL segment, clashes with a gateway route, or a page has no app.
    """
    pages = dict(pages or {})
    _check_names(apps, pages)

    @asynccontextmanager
    async def lifespan(gateway: FastAPI) -> AsyncIterator[dict[str, Any]]:
        state: dict[str, Any] = {}
        async with AsyncExitStack() as stack:
            for sub in apps.values():
                sub_state = await stack.enter_async_context(sub.router.lifespan_context(sub))
                if sub_state:
                    state.update(sub_state)
            yield state

    gateway = FastAPI(title=title, lifespan=lifespan)
    landing = _landing_page(title, apps, pages)

    @gateway.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return landing

    @gateway.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness of the gateway process; each app's readiness is at ``/<name>/readyz``."""
        return {"status": "ok", "apps": list(apps)}

    # Page routes go before the mounts: a Mount at /<name> would otherwise swallow /<name>/ui.
    for name, page in pages.items():
        gateway.add_api_route(f"/{name}/ui", _page_endpoint(page), methods=["GET"], include_in_schema=False)
    for name, sub in apps.items():
        gateway.mount(f"/{name}", sub, name=name)
    gateway.add_middleware(RequestIdMiddleware)
    return gateway


def _page_endpoint(page: str) -> Any:
    async def serve_page() -> HTMLResponse:
        return HTMLResponse(page)

    return serve_page
