"""The medical app's plug-in spec: its ``keel`` commands, its service, its page and its demo recipe.

Registered in ``pyproject.toml`` under the ``keel.apps`` entry points. Heavy imports stay inside the
commands so ``keel --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from apps.medical.data import DEV_FILE, MedicalDataError
from core.apps import AppSpec, page_beside, user_errors
from core.registry import ModelNotFoundError, TamperedArtifactError, WeightFileError

__all__ = ["APP", "DEMO_RECIPE"]

#: ``make demo``: one Lite0 at 32 px, a frozen-backbone epoch then one fine-tuning epoch on a third of the
#: training labels: about two minutes on 2 idle cores. The full recipe is ``keel train medical``.
DEMO_RECIPE: dict[str, Any] = {
    "input_size": 32,
    "label_fraction": 0.34,
    "warmup_epochs": 1,
    "finetune_epochs": 1,
    "min_steps": 0,
    "members": 1,
}

_ERRORS = (MedicalDataError, ModelNotFoundError, TamperedArtifactError, WeightFileError, FileNotFoundError, ValueError)


def train(
    data: Annotated[Path | None, typer.Option(help="npz in the PneumoniaMNIST format (default: the dev file).")] = None,
    split: Annotated[str, typer.Option(help="Split to train on (<split>_images / <split>_labels).")] = "train",
    label_fraction: Annotated[float, typer.Option(help="Stratified share of the labels used (0-1].")] = 1.0,
    backbone: Annotated[
        str, typer.Option(help="Registry ref of imported weights, or timm:NAME / torchvision:NAME (random init).")
    ] = "efficientnet_lite0-imagenet",
    pretrained: Annotated[bool, typer.Option(help="Use the backbone's weights (else random init).")] = True,
    input_size: Annotated[int, typer.Option(help="Images are upsampled to this many pixels.")] = 64,
    finetune_epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs (default: the recipe's).")] = None,
    patience: Annotated[
        int | None, typer.Option(min=1, help="Epochs without a better held-out AUC before stopping (default: 2).")
    ] = None,
    members: Annotated[int, typer.Option(min=1, help="Ensemble size.")] = 1,
    decision_prior: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            max=0.999,
            help="Pneumonia prevalence where the model is used, for the decision threshold (default: the "
            "training prevalence; the official test split has 0.625).",
        ),
    ] = None,
    tta: Annotated[int, typer.Option(min=0, help="Test-time augmentation: augmented views per image.")] = 0,
    mixup: Annotated[float, typer.Option(min=0.0, help="Mixup Beta(a, a) parameter while fine-tuning (0: off).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    precision: Annotated[str, typer.Option(help="'auto', '32', 'bf16-mixed', '16-mixed'.")] = "auto",
    ensemble_of: Annotated[
        str | None,
        typer.Option(
            help="Train nothing: combine these registered medical models (comma-separated refs trained on the same "
            "images, e.g. a Lite0 and a ResNet-18) into one calibrated ensemble; --tta and --decision-prior apply."
        ),
    ] = None,
) -> None:
    """Fine-tune the X-ray classifier, calibrate it and register it as ``medical`` (alias ``production``)."""
    from apps.medical.train import MedicalTrainConfig, main

    if ensemble_of is not None:
        from apps.medical.ensemble import assemble
        from core.registry import ModelRegistry

        refs = [r.strip() for r in ensemble_of.split(",") if r.strip()]
        with user_errors(*_ERRORS):
            version = assemble(ModelRegistry(), refs, tta=tta, decision_prior=decision_prior)
        typer.echo(json.dumps({"registered": version.ref, "metrics": version.metrics}))
        return

    overrides: dict[str, Any] = {
        "split": split,
        "label_fraction": label_fraction,
        "backbone": backbone,
        "pretrained": pretrained,
        "input_size": input_size,
        "members": members,
        "decision_prior": decision_prior,
        "tta": tta,
        "mixup": mixup,
        "seed": seed,
        "precision": precision,
    }
    if data is not None:
        overrides["data_path"] = str(data)
    if finetune_epochs is not None:
        overrides["finetune_epochs"] = finetune_epochs
    if patience is not None:
        overrides["patience"] = patience
    with user_errors(*_ERRORS):
        version = main(MedicalTrainConfig(**overrides))
    typer.echo(json.dumps({"registered": version.ref, "metrics": version.metrics}))


def evaluate(
    data: Annotated[Path, typer.Option(help="npz with <split>_images and <split>_labels.")],
    split: Annotated[str, typer.Option(help="Split name inside the npz, e.g. val or test.")] = "val",
    model: Annotated[str, typer.Option(help="Model reference NAME@VERSION or NAME@ALIAS.")] = "medical@production",
    adapt_prior: Annotated[
        bool, typer.Option(help="Re-target the probabilities to the prevalence estimated (unlabelled) on DATA.")
    ] = False,
    decision_prior: Annotated[
        float | None,
        typer.Option(help="Prevalence to decide for (default: the model's own, by default its training prevalence)."),
    ] = None,
) -> None:
    """Score a registered model on one split of DATA; the last line is one JSON object (SPEC 5)."""
    from apps.medical.evaluate import evaluate as run_eval
    from core.registry import ModelRegistry

    with user_errors(*_ERRORS):
        result = run_eval(
            model, data, split, registry=ModelRegistry(), adapt_prior=adapt_prior, decision_prior=decision_prior
        )
    typer.echo(json.dumps(result))


def demo(*, data_dir: Path | None) -> None:
    """Train the small demo model on the real dev data (or, without it, on synthetic X-rays)."""
    import tempfile

    import numpy as np

    from apps.medical.data import synthetic_xrays
    from apps.medical.train import MedicalTrainConfig, main

    if data_dir is not None and (data_dir / DEV_FILE).is_file():
        typer.echo("medical: Lite0 (ImageNet weights) fine-tuned on real PneumoniaMNIST (medical@production)")
        path = data_dir / DEV_FILE
    else:
        typer.secho("medical: no PneumoniaMNIST data found (KEEL_DATA_DIR): training on SYNTHETIC X-rays", fg="yellow")
        fake = synthetic_xrays(600, seed=0)
        path = Path(tempfile.mkdtemp(prefix="keel-medical-")) / "synthetic.npz"
        np.savez(path, train_images=fake.images, train_labels=fake.labels)
    version = main(MedicalTrainConfig(data_path=str(path), **DEMO_RECIPE))
    typer.echo(f"medical: registered {version.ref} in {version.metrics['train_seconds']:.0f} s")


def create_service():  # noqa: ANN201 - FastAPI is imported lazily
    from apps.medical.service import create_app

    return create_app()


APP = AppSpec(
    name="medical",
    summary="Chest X-rays: a fine-tuned pretrained backbone, calibrated probabilities, Grad-CAM saliency.",
    train=train,
    evaluate=evaluate,
    create_service=create_service,
    demo=demo,
    page=page_beside(__file__),
)
