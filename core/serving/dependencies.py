"""FastAPI dependencies shared by every service: the model handle, the settings and the admin API key.

Each reads what :func:`core.serving.factory.create_service` put on ``app.state``, so a route written against
``ModelDep`` works in any service, standalone or mounted in the gateway; tests override them through
``app.dependency_overrides``.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from core.serving.model_handle import ModelHandle
from core.serving.settings import ServingSettings

__all__ = ["AdminDep", "ModelDep", "SettingsDep", "get_handle", "get_service_settings", "require_api_key"]


def get_handle(request: Request) -> ModelHandle:
    """The :class:`ModelHandle` of the service answering this request."""
    handle: ModelHandle = request.app.state.handle
    return handle


def get_service_settings(request: Request) -> ServingSettings:
    """The :class:`ServingSettings` the service was built with."""
    settings: ServingSettings = request.app.state.settings
    return settings


ModelDep = Annotated[ModelHandle, Depends(get_handle)]
SettingsDep = Annotated[ServingSettings, Depends(get_service_settings)]


def require_api_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Header(description="Admin API key (the KEEL_API_KEY setting).")] = None,
) -> None:
    """Lets a request through only with the right ``X-API-Key``.

    Raises:
        HTTPException: 503 when no key is configured (admin routes are off), 401 when the key is missing or wrong.
    """
    if not settings.admin_enabled or settings.api_key is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "admin endpoints are disabled: set KEEL_API_KEY to enable them"
        )
    expected = settings.api_key.get_secret_value()
    # compare_digest: the time taken must not reveal how much of the key was right.
    if x_api_key is None or not secrets.compare_digest(x_api_key.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong API key: send it in the X-API-Key header",
            headers={"WWW-Authenticate": "APIKey"},
        )


AdminDep = Depends(require_api_key)
