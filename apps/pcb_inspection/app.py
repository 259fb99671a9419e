"""The PCB inspection app's plug-in spec: its ``keel`` commands, its service and its demo recipe.

Registered in ``pyproject.toml`` under the ``keel.apps`` entry points. Heavy imports stay inside the commands so
``keel --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from apps.pcb_inspection.data import DataFormatError
from core.apps import AppSpec, page_beside, user_errors
from core.registry import ModelNotFoundError, TamperedArtifactError
from core.utils.registry import UnknownNameError

__all__ = ["APP"]


def train(
    recipe: Annotated[str, typer.Option(help="'demo' (~2 min on 2 CPU cores), 'cpu' or 'gpu'.")] = "cpu",
    list_file: Annotated[
        Path | None, typer.Option("--list", help="DeepPCB pair list (default: trainval.txt in the data dir).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder the list's paths are relative to.")] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Held-out part: 'group' (20% by board group), 'random' or 'none' (default: the recipe's)."),
    ] = None,
    budget_s: Annotated[float | None, typer.Option(help="Wall-clock seconds of training (default: the recipe's).")] = (
        None
    ),
    model: Annotated[str | None, typer.Option(help="Model variant (default: the recipe's).")] = None,
    precision: Annotated[str, typer.Option(help="'auto', '32', 'bf16-mixed'.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the detector, score the held-out part and register it with the alias ``production``."""
    from apps.pcb_inspection.train import RECIPES, main

    overrides: dict[str, Any] = {"precision": precision, "seed": seed}
    options = (
        ("list_file", list_file),
        ("data_dir", data_dir),
        ("budget_s", budget_s),
        ("model", model),
        ("split", split),
    )
    for key, value in options:
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    with user_errors(DataFormatError, FileNotFoundError, ValueError, UnknownNameError):
        version, report = main(dataclasses.replace(RECIPES.get(recipe), **overrides))
    typer.echo(json.dumps({"registered": version.ref if version else None, **report}))


def evaluate(
    data_dir: Annotated[
        Path, typer.Option(exists=True, file_okay=False, help="Folder the list's paths are relative to (PCBData).")
    ],
    list_file: Annotated[
        Path, typer.Option("--list", exists=True, dir_okay=False, help="DeepPCB pair list (e.g. test.txt).")
    ],
    model: Annotated[str, typer.Option(help="Model reference NAME@VERSION or NAME@ALIAS.")] = (
        "pcb_inspection@production"
    ),
) -> None:
    """Score a registered model on the pairs of LIST; the last line is one JSON object (SPEC section 5)."""
    from apps.pcb_inspection.evaluate import evaluate as run_eval
    from core.registry import ModelRegistry

    with user_errors(DataFormatError, ModelNotFoundError, TamperedArtifactError, FileNotFoundError):
        result = run_eval(model, data_dir=data_dir, list_file=list_file, registry=ModelRegistry())
    typer.echo(json.dumps(result))


def demo(*, data_dir: Path | None) -> None:
    """Train the demo detector on the real DeepPCB pairs (about 2 minutes on 2 cores), when they are there."""
    from apps.pcb_inspection.train import RECIPES, main

    list_file = None if data_dir is None else data_dir / "pcb" / "DeepPCB" / "PCBData" / "trainval.txt"
    if list_file is None or not list_file.is_file():
        typer.secho(
            "pcb_inspection: no DeepPCB data found (KEEL_DATA_DIR/pcb/DeepPCB): no model trained; /pcb_inspection "
            "stays not-ready (503) until `keel train pcb_inspection --list FILE`",
            fg="yellow",
        )
        return
    typer.echo("pcb_inspection: the small detector on the real DeepPCB pairs (pcb_inspection@production)")
    main(dataclasses.replace(RECIPES.get("demo"), list_file=str(list_file), progress=True))


def create_service():  # noqa: ANN201 - FastAPI is imported lazily
    from apps.pcb_inspection.service import create_app

    return create_app()


APP = AppSpec(
    name="pcb_inspection",
    summary="PCB defect inspection: template-aware detector on DeepPCB pairs, boxes drawn on upload.",
    train=train,
    evaluate=evaluate,
    create_service=create_service,
    demo=demo,
    page=page_beside(__file__),
)
