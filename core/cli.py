"""The ``keel`` command line: one entry point for every app and core tool.

App commands (``train``, ``eval``, ``stream``) are built from each app's :class:`core.apps.AppSpec`,
so adding an app adds its sub-commands without touching this file.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Annotated

import typer

from core.apps import AppSpec, load_apps
from core.utils.openmp import short_spin_waits

__all__ = ["app", "build_cli", "main"]

app = typer.Typer(
    help="Keel: training, compression, serving and streaming for five vertical apps.", no_args_is_help=True
)

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def build_cli() -> typer.Typer:
    """The full ``keel`` command: the core commands plus every installed app's sub-commands."""
    from core.registry.cli import registry_app

    train_app = typer.Typer(help="Train an app's model and register it.", no_args_is_help=True)
    eval_app = typer.Typer(
        help="Evaluate a registered model; the last line printed is one JSON object.", no_args_is_help=True
    )
    stream_app = typer.Typer(help="Run an app's stream processor.", no_args_is_help=True)
    for name in load_apps():
        spec = load_apps().get(name)
        train_app.command(name=name, help=f"Train {name}: {spec.summary}")(spec.train)
        eval_app.command(name=name, help=f"Evaluate {name} (SPEC section 5 contract).")(spec.evaluate)
        if spec.stream is not None:
            stream_app.command(name=name, help=f"Stream processor of {name}.")(spec.stream)
    cli = typer.Typer(help=app.info.help, no_args_is_help=True)
    cli.registered_commands.extend(app.registered_commands)
    cli.add_typer(train_app, name="train")
    cli.add_typer(eval_app, name="eval")
    cli.add_typer(stream_app, name="stream")
    cli.add_typer(registry_app, name="registry", help="List, show and promote registered model versions.")
    from core.compression.cli import compress_command

    cli.command("compress", help="Compress a registered model (SPEC 2.6); registers the result with its lineage.")(
        compress_command
    )
    return cli


@app.command("apps")
def list_apps() -> None:
    """List the installed apps."""
    for name in load_apps():
        typer.echo(f"{name:16s} {load_apps().get(name).summary}")


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help="An app name, or 'all' for the gateway with every app.")] = "all",
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Serve one app, or every app behind the gateway."""
    import uvicorn

    from core.serving.gateway import build_gateway

    apps = load_apps()
    if target == "all":
        specs = [apps.get(n) for n in apps]
        asgi = build_gateway({s.name: s.create_service() for s in specs}, pages=_pages(specs))
    else:
        asgi = _get_app(target).create_service()
    uvicorn.run(asgi, host=host, port=port, log_level="info")


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the gateway afterwards.")] = True,
) -> None:
    """Train a small model for every app (real data when found, else simulators), then serve them all."""
    from core.config import data_dir

    root = data_dir()
    if root is None:
        typer.secho(
            "No real data found (KEEL_DATA_DIR or ../shared/data): training on the built-in simulators.", fg="yellow"
        )
    else:
        typer.echo(f"Real data: {root}")
    for name in load_apps():
        typer.secho(f"== {name}: training the demo model", bold=True)
        load_apps().get(name).demo(data_dir=root)
    if serve_after:
        typer.secho(f"Serving every app on http://{host}:{port}/ (Ctrl-C to stop)", fg="green", bold=True)
        serve("all", host=host, port=port)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Benchmark name (a file in benchmarks/).")]
) -> None:
    """Run ``benchmarks/NAME.py``; it prints a table and writes JSON. Extra options go to the script."""
    path = BENCHMARKS_DIR / f"{name}.py"
    if name.startswith("_") or not path.is_file():  # _common.py and the like are helpers, not benchmarks
        known = ", ".join(sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py") if not p.stem.startswith("_")))
        raise typer.BadParameter(f"no benchmark {name!r} in {BENCHMARKS_DIR}; known: {known}", param_hint="NAME")
    sys.argv = [str(path), *ctx.args]
    runpy.run_path(str(path), run_name="__main__")


def _get_app(name: str) -> AppSpec:
    apps = load_apps()
    if name not in apps:
        raise typer.BadParameter(f"unknown app {name!r}; installed: {', '.join(apps.names())}", param_hint="TARGET")
    return apps.get(name)


def _pages(specs: list[AppSpec]) -> dict[str, str]:
    return {s.name: s.page for s in specs if s.page}


def main() -> None:
    short_spin_waits()  # before any app imports torch or numba
    build_cli()()


if __name__ == "__main__":
    main()
