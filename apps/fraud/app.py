"""The fraud app's plug-in spec: its ``keel`` commands, its service and its demo recipe.

Registered in ``pyproject.toml`` under the ``keel.apps`` entry points. Heavy imports stay inside the
commands so ``keel --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from core.apps import AppSpec

__all__ = ["APP"]


def train(
    source: Annotated[
        str, typer.Option(help="'ulb' (the real card data) or 'simulator' (per-card sequences).")
    ] = "ulb",
    data: Annotated[Path | None, typer.Option(help="ULB-format CSV (default: the dev file in the data dir).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: the recipe's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the fraud model and register it with the alias ``production``."""
    from apps.fraud.train import FraudTrainConfig, main

    overrides: dict[str, object] = {"source": source, "seed": seed}
    if data is not None:
        overrides["data_path"] = str(data)
    if epochs is not None:
        overrides["epochs"] = epochs
    version = main(FraudTrainConfig(**overrides))
    typer.echo(json.dumps({"registered": version.ref, "metrics": version.metrics}))


def evaluate(
    data: Annotated[
        Path,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="CSV in the dev file's format (Time, V1..V28, Amount, Class).",
        ),
    ],
    model: Annotated[str, typer.Option(help="Model reference NAME@VERSION or NAME@ALIAS.")] = "fraud@production",
) -> None:
    """Score a registered model and the GBDT baseline on DATA; the last line is one JSON object."""
    from apps.fraud.evaluate import evaluate as run_eval
    from core.registry import ModelRegistry

    typer.echo(json.dumps(run_eval(model, data, registry=ModelRegistry())))


def demo(*, data_dir: Path | None) -> None:
    """Train the demo models: the ULB model on real data when present, and the per-card sequence model."""
    from apps.fraud.train import FraudTrainConfig, main

    if data_dir is not None and (data_dir / "fraud" / "creditcard_ulb_sample_dev.csv").is_file():
        main(FraudTrainConfig(source="ulb", data_path=str(data_dir / "fraud" / "creditcard_ulb_sample_dev.csv")))
    else:
        typer.secho(
            "fraud: no ULB data found, the card-data model is skipped; training on the simulator only", fg="yellow"
        )
    main(FraudTrainConfig(source="simulator"))


def create_service():  # noqa: ANN201 - FastAPI is imported lazily
    from apps.fraud.service import create_app

    return create_app()


def stream(
    bus: Annotated[str, typer.Option(help="Event bus backend: 'kafka' or 'memory'.")] = "kafka",
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap servers.")] = "127.0.0.1:9092",
    topic: Annotated[str, typer.Option(help="Input topic of transactions.")] = "transactions",
    alerts: Annotated[str, typer.Option(help="Output topic of alerts.")] = "fraud-alerts",
    group: Annotated[str, typer.Option(help="Consumer group id.")] = "keel-fraud-scorer",
    model: Annotated[str, typer.Option(help="Model reference (a per-card model).")] = "fraud-card@production",
    max_events: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    idle_timeout: Annotated[float | None, typer.Option(help="Stop after this many idle seconds.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Most events scored per batch (and per commit).")] = 2000,
) -> None:
    """Consume transactions, score them, publish alerts and update the card features."""
    from apps.fraud.stream import run_stream

    stats = run_stream(
        bus=bus,
        bootstrap=bootstrap,
        topic=topic,
        alerts_topic=alerts,
        group_id=group,
        model_ref=model,
        max_events=max_events,
        idle_timeout_s=idle_timeout,
        max_poll_records=batch_size,
    )
    typer.echo(json.dumps(stats))


def _page() -> str:
    return (Path(__file__).parent / "page.html").read_text()


APP = AppSpec(
    name="fraud",
    summary="Card-transaction fraud: per-card sequences + velocity features, calibrated scores, streaming alerts.",
    train=train,
    evaluate=evaluate,
    create_service=create_service,
    demo=demo,
    stream=stream,
    page=_page(),
)
