"""``keel compress MODEL_REF --technique T [--technique T2 ...] --calibration-data FILE.npz``.

Loads a registered version, applies the techniques in order, measures before / after on the data
file, and registers the result as a new version whose parent is the original (lineage). Example::

    keel compress pneumonia-r18@3 --technique channel_pruning --option pruning_rate=0.5 \\
        --technique static_int8 --calibration-data ../shared/data/medical/pneumoniamnist_dev.npz

The data file is an ``.npz`` holding ``<split>_images`` and ``<split>_labels`` (MedMNIST layout) or
``images`` / ``labels``. Images are scaled to [0, 1], given the model's channel count, resized and
normalised as the version's ``config["input"]`` says (``size``, ``mean``, ``std``) when it says so.
Heavy imports (torch, timm) happen inside the command so ``keel --help`` stays fast.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["compress_command", "load_npz_images", "parse_options"]


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["pruning_rate=0.5", "metric=l1"]`` -> ``{"pruning_rate": 0.5, "metric": "l1"}`` (JSON values parsed)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def load_npz_images(path: Path, split: str | None, *, max_samples: int | None = None) -> tuple[Any, Any]:
    """(images as float32 (N, C, H, W) in [0, 1], labels or None) from an ``.npz`` file.

    Raises:
        ValueError: missing file, not an npz, or no images array for ``split``.
    """
    import numpy as np
    import torch

    if not path.is_file():
        raise ValueError(f"calibration data file {path} does not exist")
    img_key, lab_key = (f"{split}_images", f"{split}_labels") if split else ("images", "labels")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .npz file: {err}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive of <split>_images / <split>_labels")
    with data:
        if img_key not in data.files:
            files = ", ".join(data.files)
            raise ValueError(f"{path} has no array {img_key!r} (arrays: {files}); pick one with --split")
        images = data[img_key][:max_samples]
        labels = data[lab_key][:max_samples] if lab_key in data.files else None
    x = torch.from_numpy(images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0))
    if x.ndim == 3:
        x = x[:, None]  # (N, H, W) -> (N, 1, H, W)
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    y = torch.from_numpy(labels.reshape(-1).astype(np.int64)) if labels is not None else None
    return x.contiguous(), y


def _prepare(x: Any, *, channels: int, spec: dict[str, Any], size: int | None) -> Any:
    import torch
    import torch.nn.functional as F

    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise ValueError(f"the data has {x.shape[1]} channels and the model takes {channels}")
        x = x.expand(-1, channels, -1, -1)
    size = size or spec.get("size")
    if size and tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if "mean" in spec and "std" in spec:
        mean = torch.tensor(spec["mean"][:channels]).view(1, -1, 1, 1)
        x = (x - mean) / torch.tensor(spec["std"][:channels]).view(1, -1, 1, 1)
    return x.contiguous()


def _in_channels(model: Any) -> int:
    import torch.nn as nn

    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(
            "keel compress handles image models (no Conv2d found); use core.compression.compress in Python"
        )
    return int(first.in_channels)


def compress_command(
    model_ref: Annotated[str, typer.Argument(help="Registry ref: name, name@VERSION or name@ALIAS.")],
    technique: Annotated[list[str], typer.Option("--technique", "-t", help="Technique (repeat to chain them).")],
    calibration_data: Annotated[Path, typer.Option("--calibration-data", help=".npz with <split>_images/_labels.")],
    split: Annotated[str, typer.Option(help="Split used to calibrate ('' for images/labels).")] = "train",
    val_split: Annotated[str, typer.Option(help="Split the report's accuracy is measured on ('' for none).")] = "val",
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="KEY=VALUE for the techniques.")] = None,
    max_samples: Annotated[int, typer.Option(help="At most this many calibration / validation images.", min=1)] = 512,
    image_size: Annotated[
        int | None, typer.Option(help="Resize images to this size (default: config or data).")
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Latency batch sizes, comma-separated ('' for none).")] = "1,16",
    latency_repeats: Annotated[int, typer.Option(help="Timed runs per latency figure (median).", min=1)] = 10,
    name: Annotated[str | None, typer.Option(help="Register under this name (default: the original's).")] = None,
    root: Annotated[Path | None, typer.Option("--root", help="Registry folder (default: $KEEL_HOME/registry).")] = None,
) -> None:
    """Compress a registered model and register the result (its parent is MODEL_REF)."""
    from core.apps import user_errors
    from core.registry.store import ModelNotFoundError, TamperedArtifactError

    options = parse_options(option or [])
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected integers like 1,16; got {batch_sizes!r}", param_hint="--batch-sizes"
        ) from None
    timing = {"batch_sizes": sizes, "latency_repeats": latency_repeats}
    with user_errors(ValueError, KeyError, ModelNotFoundError, TamperedArtifactError), warnings.catch_warnings():
        # torch.load of int8 (quantized) tensors goes through TypedStorage, which torch warns about on every load
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        _run(
            model_ref,
            technique,
            calibration_data,
            split,
            val_split,
            options,
            max_samples,
            image_size,
            name,
            root,
            timing,
        )


def _run(ref: str, techniques: list[str], data_path: Path, split: str, val_split: str, options: dict[str, Any],
         max_samples: int, image_size: int | None, name: str | None, root: Path | None,
         timing: dict[str, Any]) -> None:  # fmt: skip
    from core.compression.artifacts import REBUILDABLE, build_base, rebuild, structure_of
    from core.compression.techniques import TECHNIQUES, compress
    from core.config import keel_home
    from core.registry.store import ModelRegistry

    for t in techniques:
        TECHNIQUES.get(t)  # unknown names fail before any work, listing the known ones
        if t not in REBUILDABLE:
            raise ValueError(f"technique {t!r} trains a model; run it from Python (core.compression.compress)")
    unused = set(options) - {k for t in techniques for k in _accepted(TECHNIQUES.get(t))}
    if unused:
        raise ValueError(f"option(s) {', '.join(sorted(unused))} are taken by none of the techniques {techniques}")
    registry = ModelRegistry(root or keel_home() / "registry")
    mv, state = registry.load(ref)
    if mv.config.get("kind") == "compressed":
        model, base, chain = rebuild(mv.config, state), mv.config["base"], list(mv.config["chain"])
    else:
        model = build_base(mv.architecture, mv.config, mv.hparams)
        model.load_state_dict(state, strict=True)
        base, chain = {"architecture": mv.architecture, "config": mv.config, "hparams": mv.hparams}, []
    model.eval()
    spec = dict(base["config"].get("input") or {})
    x, _ = load_npz_images(data_path, split or None, max_samples=max_samples)
    x = _prepare(x, channels=_in_channels(model), spec=spec, size=image_size)
    val = None
    if val_split:
        vx, vy = load_npz_images(data_path, val_split, max_samples=max_samples)
        if vy is None:
            raise ValueError(f"{data_path} has no {val_split}_labels to measure accuracy on")
        vx = _prepare(vx, channels=_in_channels(model), spec=spec, size=image_size)
        val = list(zip(vx.split(64), vy.split(64), strict=True))
    calib = list(x.split(32))
    reports = []
    for t in techniques:
        opts = {k: v for k, v in options.items() if k in _accepted(TECHNIQUES.get(t))}
        result = compress(model, t, example_input=x[:1], calibration_data=calib, val_data=val, **timing, **opts)
        chain.append({"technique": t, "options": opts, "structure": structure_of(t, result.model, x[:1])})
        model = result.model
        reports.append(result.report)
        typer.echo(result.report.summary())
    first, last = reports[0], reports[-1]
    metrics = {
        "params": last.after.params, "size_bytes": last.after.size_bytes, "size_zlib_bytes": last.after.size_zlib_bytes,
        **{f"latency_ms_b{bs}": v for bs, v in last.after.latency_ms.items()},
    }  # fmt: skip
    if last.after.metric is not None and first.before.metric is not None:
        metrics.update(accuracy=last.after.metric, accuracy_before=first.before.metric)
    config = {"kind": "compressed", "base": base, "chain": chain, "input": spec, "calibration": str(data_path)}
    new = registry.register(
        name or mv.name, {k: v for k, v in model.state_dict().items()}, architecture=f"{base['architecture']}+"
        + "+".join(c["technique"] for c in chain), config=config, hparams=mv.hparams, metrics=metrics, parent=mv.ref,
        data_fingerprint=mv.data_fingerprint,
    )  # fmt: skip
    typer.echo(f"registered {new.ref} (parent {mv.ref})")
    typer.echo(json.dumps({"ref": new.ref, "parent": mv.ref, "techniques": techniques, "metrics": metrics}))


def _accepted(fn: Any) -> set[str]:
    import inspect

    params = inspect.signature(fn).parameters
    return {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
