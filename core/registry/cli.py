"""``keel registry ls / show / promote / import``: the registry from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core.config import keel_home
from core.registry.store import ModelNotFoundError, ModelRegistry

__all__ = ["registry_app"]

registry_app = typer.Typer(help="Inspect and promote registered model versions.", no_args_is_help=True)

RootOpt = Annotated[
    Path | None, typer.Option("--root", help="Registry folder (default: $KEEL_HOME/registry or ./.keel/registry).")
]


def _open(root: Path | None) -> ModelRegistry:
    return ModelRegistry(root if root is not None else keel_home() / "registry")


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=1)


@registry_app.command("ls")
def ls(name: Annotated[str | None, typer.Argument(help="Only this model.")] = None, root: RootOpt = None) -> None:
    """List registered versions as a table."""
    versions = _open(root).list(name)
    if not versions:
        typer.echo(f"no versions of {name!r} registered" if name else "registry is empty")
        return
    table = Table(title="Keel model registry")
    for column in ("ref", "architecture", "aliases", "metrics", "parent", "created (UTC)", "sha256"):
        table.add_column(column)
    for mv in versions:
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in mv.metrics.items())
        table.add_row(
            mv.ref,
            mv.architecture,
            ", ".join(mv.aliases),
            metrics,
            mv.parent or "",
            mv.created_at[:19],
            mv.sha256[:12],
        )
    Console(width=200).print(table)


@registry_app.command("show")
def show(ref: Annotated[str, typer.Argument(help="name, name@VERSION or name@ALIAS")], root: RootOpt = None) -> None:
    """Print one version's metadata as JSON."""
    try:
        mv = _open(root).get(ref)
    except ModelNotFoundError as err:
        _fail(str(err))
        return
    typer.echo(json.dumps(mv.to_dict(), indent=2, sort_keys=True))


@registry_app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version to point the alias at.", min=1)],
    alias: Annotated[str, typer.Option("--alias", help="Alias to move.")] = "production",
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the alias history).")] = "",
    root: RootOpt = None,
) -> None:
    """Point NAME@ALIAS at VERSION (the move is kept in the alias history)."""
    try:
        event = _open(root).promote(name, alias, version, reason=reason)
    except (ModelNotFoundError, ValueError) as err:
        _fail(str(err))
        return
    before = f"v{event.from_version}" if event.from_version is not None else "nothing"
    typer.echo(f"{name}@{alias}: {before} -> v{event.to_version}")


@registry_app.command("import")
def import_(
    converter: Annotated[str, typer.Argument(help="Converter: 'efficientnet-lite0' or 'resnet50'.")],
    weights: Annotated[
        Path | None, typer.Argument(help="Weight file (default: the converter's packaged weights, if any).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Registry name (default: the converter's).")] = None,
    alias: Annotated[list[str] | None, typer.Option("--alias", help="Alias(es) to point at the new version.")] = None,
    root: RootOpt = None,
) -> None:
    """Convert a local pretrained weight file into a timm architecture and register it (with its provenance)."""
    from core.registry.importers import WeightFileError, import_weights
    from core.utils.registry import UnknownNameError

    try:
        mv = import_weights(converter, weights, registry=_open(root), name=name, aliases=tuple(alias or ()))
    except (WeightFileError, UnknownNameError, ValueError) as err:
        _fail(str(err))
        return
    source = mv.config["source"]
    typer.echo(f"registered {mv.ref} ({mv.architecture}) from {source['file']} (sha256 {source['sha256'][:12]})")
