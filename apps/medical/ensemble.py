"""Ensembles of registered medical models, heterogeneous ones included (the pretrained Lite0 with a ResNet-18).

Networks of different architectures make less correlated mistakes than seeds of one architecture, so their
average pays more (Dietterich, "Ensemble Methods in Machine Learning", 2000; Lakshminarayanan et al. 2017 for
deep ensembles). :func:`assemble` combines already registered models without retraining any of them:

1. the sources must have been trained on the same labelled images with the same held-out part (same data
   file and fingerprint, split, label fraction, held-out share and seed: :func:`apps.medical.train.split_labelled`
   is deterministic in them), so the held-out images are unseen by every member;
2. each source is temperature-scaled alone on those images (with the ensemble's test-time augmentation), which
   puts every member's logit on one scale (balanced log-odds); each source counts equally in the mean;
3. the mean is calibrated once more (:func:`apps.medical.train.calibrate`) and registered as a new version of
   ``name`` with the first source as its parent.

With one source this recalibrates a model for another ``tta`` (test-time augmentation) without retraining it.

Run::

    keel train medical --ensemble-of medical@1,medical@2 --tta 4
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from apps.medical.data import load_split
from apps.medical.model import MedicalPredictor, load_predictor
from apps.medical.train import MedicalTrainConfig, calibrate, split_labelled
from core.registry import ModelRegistry, ModelVersion, fingerprint_file

__all__ = ["SAME_SPLIT_KEYS", "assemble", "source_recipe"]

#: Recipe settings that fix the labelled images and their held-out part; sources must agree on all of them.
SAME_SPLIT_KEYS = ("data_path", "split", "label_fraction", "holdout_frac", "seed")


def source_recipe(version: ModelVersion) -> MedicalTrainConfig:
    """The training recipe a registered medical model records (unknown keys of newer recipes are an error)."""
    if version.config.get("kind") != "medical":
        raise ValueError(f"{version.ref} is not a medical model (config kind {version.config.get('kind')!r})")
    data_path = version.config["train"]["data_path"]  # resolved at training time (the recipe may hold None)
    return MedicalTrainConfig(**{**version.config["recipe"], "data_path": data_path, "registry_root": None})


def _check_same_split(versions: list[ModelVersion], recipes: list[MedicalTrainConfig]) -> None:
    first, base = versions[0], recipes[0]
    for version, recipe in zip(versions[1:], recipes[1:], strict=True):
        for key in SAME_SPLIT_KEYS:
            if getattr(recipe, key) != getattr(base, key):
                raise ValueError(
                    f"{version.ref} and {first.ref} were trained on different images ({key}: "
                    f"{getattr(recipe, key)!r} vs {getattr(base, key)!r}); an ensemble needs one held-out part"
                )
        if version.data_fingerprint != first.data_fingerprint:
            raise ValueError(f"{version.ref} and {first.ref} were trained on different data files (fingerprints)")
    path = Path(base.data_path or "")
    if not path.is_file() or fingerprint_file(path) != first.data_fingerprint:
        raise ValueError(f"{path}: the training data of {first.ref} is missing or changed since it was registered")


def _member_terms(
    sources: list[MedicalPredictor], calibrations: list[tuple[float, float]], *, prior: float
) -> tuple[list[float], list[float]]:
    """Per-network (scale, shift): each source's own temperature scaling to balanced log-odds, sources weighted
    equally whatever their number of networks (the predictor averages over networks)."""
    n_nets, logit_prior = sum(len(s.nets) for s in sources), math.log(prior / (1 - prior))
    scale, shift = [], []
    for source, (temperature, bias) in zip(sources, calibrations, strict=True):
        weight = n_nets / (len(sources) * len(source.nets))
        for a, c in zip(source.member_scale, source.member_shift, strict=True):
            scale.append(weight * a / temperature)
            shift.append(weight * (c / temperature + bias - logit_prior))
    return scale, shift


def assemble(
    registry: ModelRegistry,
    refs: list[str],
    *,
    tta: int = 0,
    name: str = "medical",
    decision_prior: float | None = None,
    aliases: tuple[str, ...] = ("production",),
) -> ModelVersion:
    """Registers the calibrated ensemble of the registered medical models ``refs`` (see the module docstring).

    Raises:
        ValueError: no refs, a ref that is not a medical model, or sources trained on different images.
    """
    if not refs:
        raise ValueError("an ensemble needs at least one registered medical model")
    loaded = [registry.load(ref) for ref in refs]
    versions = [v for v, _ in loaded]
    recipes = [source_recipe(v) for v in versions]
    _check_same_split(versions, recipes)
    base = recipes[0]
    labelled, _, held = split_labelled(load_split(base.data_path or "", base.split), base)
    prior = float(labelled.labels.mean())
    sources, calibrations = [], []
    for version, state in loaded:
        source = load_predictor(version, state)
        alone = MedicalPredictor(
            source.nets, train_prior=prior, tta=tta, member_scale=source.member_scale, member_shift=source.member_shift
        )
        calibrate(alone, held, min_holdout_for_bias=base.min_holdout_for_bias)
        sources.append(source)
        calibrations.append((alone.temperature, alone.bias))
    scale, shift = _member_terms(sources, calibrations, prior=prior)
    nets = [net for source in sources for net in source.nets]
    chosen = base.decision_prior if decision_prior is None else decision_prior
    predictor = MedicalPredictor(
        nets, train_prior=prior, decision_prior=chosen, tta=tta, member_scale=scale, member_shift=shift
    )
    metrics = calibrate(predictor, held, min_holdout_for_bias=base.min_holdout_for_bias)
    return _register(registry, predictor, versions, calibrations, metrics, name=name, aliases=aliases)


def _register(
    registry: ModelRegistry,
    predictor: MedicalPredictor,
    versions: list[ModelVersion],
    calibrations: list[tuple[float, float]],
    metrics: dict[str, float],
    *,
    name: str,
    aliases: tuple[str, ...],
) -> ModelVersion:
    from apps.medical.model import net_config_dict

    first = versions[0]
    refs = [v.ref for v in versions]
    nets = predictor.medical_nets
    archs = list(dict.fromkeys(net.cfg.architecture for net in nets))
    recipe = dataclasses.asdict(dataclasses.replace(source_recipe(first), tta=predictor.tta))
    ensemble = {"of": refs, "source_calibration": [{"temperature": t, "bias": b} for t, b in calibrations]}
    config = {
        "kind": "medical",
        "net": net_config_dict(nets[0].cfg),
        "nets": [net_config_dict(net.cfg) for net in nets],
        "backbone": first.config.get("backbone"),
        "train": {**first.config["train"], "holdout_metrics": metrics, "ensemble": ensemble},
        "recipe": recipe,
        "calibration": predictor.registry_state()["calibration"],
        "ensemble": ensemble,
    }
    seconds = sum(float(v.metrics.get("train_seconds", 0.0)) for v in versions)
    return registry.register(
        name,
        predictor.registry_state(),
        architecture="medicalnet:" + "+".join(archs),
        config=config,
        hparams={"ensemble_of": refs, "tta": predictor.tta},
        metrics={**{f"holdout_{k}": v for k, v in metrics.items()}, "train_seconds": seconds},
        data_fingerprint=first.data_fingerprint,
        parent=first.ref,
        aliases=aliases,
    )
