"""The fraud app's plug-in spec: its ``keel`` commands, its service and its demo recipe.

Registered in ``pyproject.toml`` under the ``keel.apps`` entry points. Heavy imports stay inside the
commands so ``keel --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from apps.fraud.data import DataFormatError
from core.apps import AppSpec, page_beside, user_errors
from core.config import keel_home
from core.registry import ModelNotFoundError, TamperedArtifactError

__all__ = ["APP", "DEMO_SIMULATOR"]

#: The per-card sequence model's demo recipe: 2 networks x 10 epochs instead of 8 x 40, about a minute on 2 cores
#: (the full recipe takes over 10 minutes there; run it with ``keel train fraud --source simulator``).
DEMO_SIMULATOR: dict[str, Any] = {"members": 2, "epochs": 10}


def train(
    source: Annotated[
        str, typer.Option(help="'ulb' (the real card data) or 'simulator' (per-card sequences).")
    ] = "ulb",
    data: Annotated[Path | None, typer.Option(help="ULB-format CSV (default: the dev file in the data dir).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: the recipe's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue the networks' training from the checkpoints a killed run left behind.")
    ] = False,
    precision: Annotated[
        str, typer.Option(help="Training precision: 'auto', '32', 'bf16-mixed', '16-mixed'.")
    ] = "auto",
) -> None:
    """Train the fraud model and register it with the alias ``production``.

    The networks train through Keel's Trainer and checkpoint under ``<keel home>/checkpoints/<model name>``.
    """
    from apps.fraud.train import FraudTrainConfig, main

    overrides: dict[str, Any] = {"source": source, "seed": seed, "resume": resume, "precision": precision}
    if data is not None:
        overrides["data_path"] = str(data)
    if epochs is not None:
        overrides["epochs"] = epochs
    with user_errors(DataFormatError, FileNotFoundError, ValueError):
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

    with user_errors(DataFormatError, ModelNotFoundError, TamperedArtifactError, FileNotFoundError):
        result = run_eval(model, data, registry=ModelRegistry())
    typer.echo(json.dumps(result))


def demo(*, data_dir: Path | None) -> None:
    """Train the demo models: the ULB model on real data when present, and the per-card sequence model."""
    from apps.fraud.train import FraudTrainConfig, main

    if data_dir is not None and (data_dir / "fraud" / "creditcard_ulb_sample_dev.csv").is_file():
        typer.echo("fraud: the card-data model on the real ULB data (fraud@production, serves /fraud/v1/score)")
        main(FraudTrainConfig(source="ulb", data_path=str(data_dir / "fraud" / "creditcard_ulb_sample_dev.csv")))
    else:
        typer.secho(
            "fraud: no ULB card data found (KEEL_DATA_DIR): only the simulator model is trained; /fraud/v1/score "
            "scores the ULB format and stays not-ready (503) until `keel train fraud --data FILE.csv`",
            fg="yellow",
        )
    typer.echo("fraud: the per-card sequence model on simulated transactions (fraud-card@production, for the stream)")
    main(FraudTrainConfig(source="simulator", **DEMO_SIMULATOR))


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
    snapshots: Annotated[
        bool, typer.Option(help="Save the feature state now and then, so a restart replays only what came after.")
    ] = True,
    state_file: Annotated[
        Path | None, typer.Option(help="Snapshot file (default: KEEL_HOME/streams/fraud-GROUP.npz).")
    ] = None,
    snapshot_every: Annotated[float, typer.Option(min=0.001, help="Seconds between snapshots.")] = 60.0,
) -> None:
    """Consume transactions, score them, publish alerts and update the card features."""
    from apps.fraud.stream import run_stream

    state_path = (state_file or keel_home() / "streams" / f"fraud-{group}.npz") if snapshots else None
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
        state_path=state_path,
        snapshot_every_s=snapshot_every,
    )
    typer.echo(json.dumps(stats))


APP = AppSpec(
    name="fraud",
    summary="Card-transaction fraud: per-card sequences + velocity features, calibrated scores, streaming alerts.",
    train=train,
    evaluate=evaluate,
    create_service=create_service,
    demo=demo,
    stream=stream,
    page=page_beside(__file__),
)
