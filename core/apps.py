"""The app plug-in contract: each vertical app exposes one :class:`AppSpec`.

Apps are found through the ``keel.apps`` entry-point group declared in ``pyproject.toml`` (the same
mechanism a third-party plug-in uses), so the CLI, the gateway and the tests load them without
``core`` ever importing ``apps``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from core.utils.registry import Registry

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["AppSpec", "load_apps", "page_beside", "user_errors", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "keel.apps"


@dataclass(frozen=True)
class AppSpec:
    """What an app tells Keel about itself.

    The command callables are plain functions with typer-style annotated parameters: the CLI turns
    each into a sub-command (``keel train <name>``, ``keel eval <name>``, ``keel stream <name>``).

    Attributes:
        name: short name, also the URL prefix in the gateway (``/fraud``).
        summary: one line for the landing page and ``keel apps``.
        train: the ``keel train <name>`` command.
        evaluate: the ``keel eval <name>`` command; prints one JSON object as its last line (SPEC 5).
        create_service: builds the app's FastAPI service from its settings.
        demo: trains the small demo model(s) and registers them; takes the data dir (None: simulator).
        stream: the ``keel stream <name>`` command, for apps that consume an event stream.
        page: HTML of the app's small interactive page, served by the gateway at ``/<name>/ui``.
    """

    name: str
    summary: str
    train: Callable[..., Any]
    evaluate: Callable[..., Any]
    create_service: Callable[[], FastAPI]
    demo: Callable[..., Any]
    stream: Callable[..., Any] | None = None
    page: str | None = None


def page_beside(module_file: str, name: str = "page.html") -> str:
    """The HTML file ``name`` next to an app's module (``page_beside(__file__)``), for :attr:`AppSpec.page`."""
    return (Path(module_file).parent / name).read_text(encoding="utf-8")


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """In a CLI command: errors of these kinds (bad input, unknown model) print one line and exit 1, no traceback."""
    try:
        yield
    except kinds as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc


@cache
def load_apps() -> Registry[AppSpec]:
    """Every installed app, by name, loaded from the ``keel.apps`` entry points."""
    apps: Registry[AppSpec] = Registry("app")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        spec = ep.load()
        if not isinstance(spec, AppSpec):
            raise TypeError(f"entry point {ep.name!r} ({ep.value}) must be an AppSpec, got {type(spec).__name__}")
        apps.add(spec.name, spec)
    return apps
