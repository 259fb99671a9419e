"""Edge export of a fine-tuned X-ray model: static int8, channel pruning + fine-tuning, ONNX Runtime / TorchScript.

The compression itself is :mod:`core.compression` (``quantize_static``, ``ChannelPruner``, ``export_onnx`` /
``export_torchscript`` with their parity checks) and the runtime :class:`core.lite.LiteModel`; this module is the
app's glue. The network is split into its fixed fp32 preprocessing (upsampling the 28x28 image to the input size,
grey -> RGB, ImageNet normalisation; :class:`Prepare`) and the part that is compressed (backbone + head on the
prepared image; :class:`LogitCore`): the int8 graph then starts at the first convolution, not at a resize.

Variants (each but ``fp32`` an exported file, registered as ``medical-edge`` with its parent model as lineage):

* ``fp32``: the model as trained (PyTorch, the reference);
* ``onnx``: the same fp32 network on ONNX Runtime;
* ``int8_ptq``: static post-training int8 (FX graph, x86 kernels), activation ranges from training images;
* ``int8_ort``: the ``onnx`` graph (checked against PyTorch) statically quantised by ONNX Runtime (QDQ, per-channel
  int8 weights, uint8 activations, MinMax ranges from the same training images; the final linear layer stays fp32),
  the int8 path that runs in ONNX Runtime like the fp32 export;
* ``int8_qat``: int8 by quantisation-aware training: ``qat_epochs`` of fake-quantised fine-tuning with the app's
  loss and augmentation, then converted (PTQ alone measured a large AUC loss on Lite0, see the README);
* ``pruned``: ``prune_rate`` of the channels of every prunable group removed (L1), then fine-tuned with the app's
  recipe (balanced loss, augmentation, early stopping on the held-out AUC); ONNX Runtime;
* ``pruned_int8_ptq`` / ``pruned_int8_ort`` / ``pruned_int8_qat``: the pruned network quantised as above.

torch's int8 graphs (``*_ptq``, ``*_qat``) are exported as TorchScript (torch's quantized kernels), the others as
ONNX.

Calibration still applies: the temperature and bias (``p = sigmoid(z / T + b)``) are refitted on the same held-out
training images for every variant's own logits, and stored with the export; the decision prior is the parent's.

Run::

    python -m apps.medical.edge --model medical@production               # all variants, registered
    python -m apps.medical.edge --model medical@1 --registry DIR --prune-rate 0.3 --finetune-epochs 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from apps.medical.data import XraySplit, augment_batch, load_split
from apps.medical.model import MedicalNet, MedicalPredictor, Trunk, load_predictor
from apps.medical.train import MedicalTrainConfig, balanced_bce, calibrate, fit_member, split_labelled
from core.registry import ModelRegistry, ModelVersion

__all__ = [
    "EDGE_NAME",
    "VARIANTS",
    "EdgeConfig",
    "EdgeNet",
    "EdgeVariant",
    "LiteNet",
    "LogitCore",
    "Prepare",
    "build_variants",
    "export_variant",
    "load_edge_predictor",
    "main",
    "prune_and_finetune",
    "quantize",
    "quantize_aware",
    "split_net",
]

log = logging.getLogger(__name__)
_M = TypeVar("_M", bound=nn.Module)

EDGE_NAME = "medical-edge"
VARIANTS = (
    "fp32",
    "onnx",
    "int8_ptq",
    "int8_ort",
    "int8_qat",
    "pruned",
    "pruned_int8_ptq",
    "pruned_int8_ort",
    "pruned_int8_qat",
)
#: Variants written as ONNX; the rest (torch's int8 graphs) as TorchScript.
_FORMAT = {"onnx": "onnx", "pruned": "onnx", "int8_ort": "onnx", "pruned_int8_ort": "onnx"}
#: ONNX variants quantised by ONNX Runtime after the fp32 export.
_ORT_INT8 = ("int8_ort", "pruned_int8_ort")


@dataclass(frozen=True)
class EdgeConfig:
    """Settings of an edge export (recorded with every registered variant)."""

    variants: tuple[str, ...] = VARIANTS
    prune_rate: float = 0.3  # of each prunable channel group
    prune_metric: str = "l1"  # "l1" | "activation_magnitude" | "taylor" (core.compression.ChannelPruner)
    prune_round_to: int = 8  # keep multiples of 8 channels: odd widths measured slower on ONNX Runtime's kernels
    finetune_epochs: int = 1  # after pruning, with the app's recipe on the model's own training images
    finetune_lr: float = 3e-4
    calibration_images: int = 512  # training images whose activations set the post-training int8 ranges
    qat_epochs: int = 1  # quantisation-aware training epochs of the *_qat variants
    qat_lr: float = 1e-4
    seed: int = 0


class Prepare(nn.Module):
    """Greyscale (B, 1, H, W) in [0, 1] -> (B, 3, S, S) normalised: :meth:`MedicalNet.prepare` as a module."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, net: MedicalNet) -> None:
        super().__init__()
        self.size = net.cfg.input_size
        self.register_buffer("mean", net.mean.clone(), persistent=False)
        self.register_buffer("std", net.std.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


class LogitCore(nn.Module):
    """Backbone + head on a prepared image: (B, 3, S, S) -> logit (B,). Shares the modules it is given."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pooling, not .mean(): quantized kernels return channels-last maps, which quantized mean refuses
        pooled = F.adaptive_avg_pool2d(self.trunk(x), 1).flatten(1)  # (B, C, h, w) -> (B, C)
        return self.head(pooled).squeeze(1)  # (B,)


class EdgeNet(nn.Module):
    """fp32 preprocessing + a (possibly compressed) core: image (B, 1, H, W) in [0, 1] -> logit (B,)."""

    def __init__(self, prepare: Prepare, core: nn.Module) -> None:
        super().__init__()
        self.prepare, self.core = prepare, core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(self.prepare(x))


class LiteNet(nn.Module):
    """An exported variant on :class:`core.lite.LiteModel` (ONNX Runtime or TorchScript), as a logit module."""

    def __init__(self, lite: Any) -> None:
        super().__init__()
        self.lite = lite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.lite.predict(x.float().contiguous()).values()
        return torch.from_numpy(np.asarray(logits, np.float32))


def split_net(net: MedicalNet) -> EdgeNet:
    """The same function as ``net``, as preprocessing + core (sharing ``net``'s modules)."""
    return EdgeNet(Prepare(net), LogitCore(net.trunk, net.head)).eval()


def _images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).float()[:, None] / 255  # (N, 1, H, W)


def quantize(edge: EdgeNet, images: np.ndarray) -> EdgeNet:
    """Static post-training int8 of ``edge``'s core, activation ranges observed on ``images`` (N, H, W) uint8."""
    from core.compression import quantize_static

    with torch.no_grad():
        prepared = edge.prepare(_images(images))
    core = quantize_static(edge.core, calibration_data=list(prepared.split(64)), example_input=prepared[:1])
    return EdgeNet(edge.prepare, core).eval()


def quantize_aware(edge: EdgeNet, fit: XraySplit, recipe: MedicalTrainConfig, cfg: EdgeConfig) -> EdgeNet:
    """int8 of ``edge``'s core by quantisation-aware training (:func:`core.compression.train_qat`): fake-quantised
    fine-tuning on ``fit`` with the app's loss and augmentation, then conversion."""
    from core.compression import train_qat

    prepare = edge.prepare
    pos_weight = float((fit.labels == 0).sum() / max(1, (fit.labels == 1).sum()))

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        images, y = batch
        x = images.float() / 255
        x = augment_batch(x) if recipe.augment else x
        return balanced_bce(model(prepare(x)), y, pos_weight=pos_weight)

    with torch.no_grad():
        example = prepare(_images(fit.images[:1]))
    core = train_qat(
        edge.core,
        fit.dataset(),
        example_input=example,
        epochs=cfg.qat_epochs,
        lr=cfg.qat_lr,
        batch_size=recipe.batch_size,
        loss_fn=loss_fn,
        seed=cfg.seed,
        log_every_n_steps=max(1, min(50, len(fit) // recipe.batch_size)),
    )
    return EdgeNet(prepare, core).eval()


def prune_and_finetune(
    net: MedicalNet, fit: XraySplit, held: XraySplit, recipe: MedicalTrainConfig, cfg: EdgeConfig
) -> MedicalNet:
    """A copy of ``net`` with ``cfg.prune_rate`` of its channels removed, fine-tuned on ``fit`` (early stopping on
    ``held``) with the app's recipe at one learning rate."""
    from core.compression import ChannelPruner

    small = copy.deepcopy(net).eval()
    edge = split_net(small)
    rng = np.random.default_rng(cfg.seed)
    calib = fit.images[rng.choice(len(fit), min(len(fit), cfg.calibration_images), replace=False)]
    with torch.no_grad():
        prepared = edge.prepare(_images(calib))
    pruner = ChannelPruner(
        edge.core,
        cfg.prune_rate,
        cfg.prune_metric,
        example_input=prepared[:2],
        calibration_data=list(prepared.split(64)) if cfg.prune_metric != "l1" else None,
        round_to=cfg.prune_round_to,
    )
    core = pruner.prune()
    # the pruned copies of the LogitCore's parts (Trunk.stages point into them)
    small.trunk, small.head = cast(Trunk, core.trunk), cast(nn.Sequential, core.head)
    if cfg.finetune_epochs > 0:
        ft = dataclasses.replace(
            recipe, finetune_epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, min_steps=0, progress=False, seed=cfg.seed
        )
        small.set_backbone_trainable(True)
        fit_member(small.train(), fit, held, ft, pretrained=False)  # Lightning keeps the mode it is given
    # the Trainer may leave conv weights channels-last; quantisation and export expect NCHW
    return small.cpu().to(memory_format=torch.contiguous_format).eval()


@dataclass
class EdgeVariant:
    """One variant: its logit module, its calibrated predictor and (once exported) its file."""

    name: str
    module: nn.Module  # what serves it: the exported file on LiteModel (the PyTorch module for fp32)
    eager: nn.Module  # the PyTorch module it was exported from
    predictor: MedicalPredictor
    path: Path | None = None
    export: dict[str, Any] | None = None
    seconds: float = 0.0


def _predictor(
    module: nn.Module, parent: MedicalPredictor, held: XraySplit, recipe: MedicalTrainConfig
) -> MedicalPredictor:
    """``module``'s predictor: the parent's priors, temperature and bias refitted on ``module``'s own logits."""
    predictor = MedicalPredictor([module], train_prior=parent.train_prior, decision_prior=parent.decision_prior)
    calibrate(predictor, held, min_holdout_for_bias=recipe.min_holdout_for_bias)
    return predictor


def export_variant(
    name: str,
    module: nn.Module,
    folder: Path,
    *,
    example: torch.Tensor,
    source: str,
    calibration: np.ndarray | None = None,
) -> Any:
    """Writes ``module`` (image (B, 1, 28, 28) -> logit (B,)) as ONNX or TorchScript, checked against PyTorch.

    The ONNX Runtime int8 variants are exported in fp32 (that graph is what the parity check compares), then
    quantised with activation ranges from ``calibration`` ((N, H, W) uint8 training images); the returned report
    then names the int8 file.
    """
    from core.compression.export import export_onnx, export_torchscript, quantize_onnx

    if name in _ORT_INT8:
        if calibration is None or not len(calibration):
            raise ValueError(f"variant {name!r} needs calibration images")
        (folder / "fp32").mkdir(parents=True, exist_ok=True)
        fp32_variant = "pruned" if name.startswith("pruned") else "onnx"
        report = export_variant(fp32_variant, module, folder / "fp32", example=example, source=source)
        path = folder / f"{name}.onnx"
        feeds = [{"image": batch.numpy()} for batch in _images(calibration).split(64)]
        head = [i.name for i in _onnx_initializers(report.path) if _is_head_weight(i.name)]
        quantize_onnx(report.path, path, calibration=feeds, keep_fp32=head)
        return dataclasses.replace(report, path=path, size_bytes=path.stat().st_size)

    fmt = _FORMAT.get(name, "torchscript")
    kwargs: dict[str, Any] = {
        "input_names": ["image"],
        "output_names": ["logit"],
        "dynamic_axes": {"image": {0: "batch"}},
        "check_inputs": [example[:1], example[:16]],
        "source": source,
    }
    path = folder / f"{name}{'.onnx' if fmt == 'onnx' else '.pt'}"
    if fmt == "onnx":
        return export_onnx(module, example[:4], path, **kwargs)
    # int8 logits are compared with their own eager graph: the trace must reproduce it closely
    return export_torchscript(module, example[:4], path, atol=1e-3, rtol=1e-3, **kwargs)


def _onnx_initializers(path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(path)).graph.initializer)


def _is_head_weight(name: str) -> bool:
    """The classifier's weight in an exported :class:`LogitCore` (``core.head.weight``, ``core.head.1.weight``)."""
    return name.startswith("core.head.") and name.endswith(".weight")


def build_variants(
    predictor: MedicalPredictor, recipe: MedicalTrainConfig, cfg: EdgeConfig, folder: Path, *, source: str
) -> list[EdgeVariant]:
    """Every variant of ``cfg.variants`` for the one-network ``predictor`` trained with ``recipe``, calibrated and
    (but ``fp32``) exported to ``folder`` and loaded back in :class:`core.lite.LiteModel`."""
    from core.lite import LiteModel

    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown edge variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if len(predictor.nets) != 1:
        raise ValueError(f"edge export takes a one-network model; {source} is an ensemble of {len(predictor.nets)}")
    if recipe.data_path is None:
        raise ValueError(f"{source} records no training data path; cannot rebuild its held-out images")
    _, fit, held = split_labelled(load_split(recipe.data_path, recipe.split), recipe)
    net = predictor.medical_nets[0]
    calib = fit.images[np.random.default_rng(cfg.seed).choice(len(fit), min(len(fit), cfg.calibration_images), False)]
    example = _images(fit.images[:16])
    wanted = set(cfg.variants)
    modules: dict[str, nn.Module] = {"fp32": split_net(net), "onnx": split_net(net)}
    timings: dict[str, float] = {}

    def timed(name: str, build: Callable[[], _M]) -> _M:
        start = time.perf_counter()
        modules[name] = built = build()
        timings[name] = time.perf_counter() - start
        return built

    if "int8_ptq" in wanted:
        timed("int8_ptq", lambda: quantize(split_net(net), calib))
    if "int8_ort" in wanted:
        modules["int8_ort"] = split_net(net)  # quantised by ONNX Runtime after its export
    if "int8_qat" in wanted:
        timed("int8_qat", lambda: quantize_aware(split_net(net), fit, recipe, cfg))
    if wanted & {"pruned", "pruned_int8_ptq", "pruned_int8_ort", "pruned_int8_qat"}:
        pruned = timed("pruned", lambda: split_net(prune_and_finetune(net, fit, held, recipe, cfg)))
        if "pruned_int8_ptq" in wanted:
            timed("pruned_int8_ptq", lambda: quantize(pruned, calib))
        if "pruned_int8_ort" in wanted:
            modules["pruned_int8_ort"] = pruned
        if "pruned_int8_qat" in wanted:
            timed("pruned_int8_qat", lambda: quantize_aware(pruned, fit, recipe, cfg))
    out = []
    for name in cfg.variants:
        eager = modules[name]
        if name == "fp32":
            variant = EdgeVariant(name, eager, eager, _predictor(eager, predictor, held, recipe))
        else:
            start = time.perf_counter()
            report = export_variant(name, eager, folder, example=example, source=f"{source} ({name})",
                                    calibration=calib)  # fmt: skip
            if name in _ORT_INT8:  # the quantisation happens in the export
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
            lite = LiteNet(LiteModel.load(report.path, threads=torch.get_num_threads()))
            # calibrated on the exported file's own logits: what a deployment computes
            variant = EdgeVariant(name, lite, eager, _predictor(lite, predictor, held, recipe), report.path)
            variant.export = report.to_dict()
        variant.seconds = timings.get(name, 0.0)
        out.append(variant)
    return out


def register_variant(
    registry: ModelRegistry, variant: EdgeVariant, *, parent: ModelVersion, cfg: EdgeConfig, metrics: dict[str, Any]
) -> ModelVersion:
    """Registers an exported variant as the next ``medical-edge`` version, its parent the fine-tuned model."""
    from core.lite.artifact import architecture_for, artifact_state

    if variant.path is None or variant.export is None:
        raise ValueError(f"variant {variant.name!r} was not exported")
    fmt = variant.export["format"]
    state = artifact_state(fmt, variant.path.read_bytes())
    p = variant.predictor
    calibration = {"temperature": p.temperature, "bias": p.bias, "train_prior": p.train_prior}
    calibration["decision_prior"] = p.decision_prior
    config = {
        "kind": "medical-edge",
        "variant": variant.name,
        "format": fmt,
        "meta": variant.export["meta"],
        "net": parent.config["net"],
        "calibration": calibration,
        "edge": {**dataclasses.asdict(cfg), "variants": list(cfg.variants)},
    }
    return registry.register(
        EDGE_NAME,
        state,
        architecture=architecture_for(fmt) + f":{parent.architecture}",
        config=config,
        hparams=dataclasses.asdict(cfg),
        metrics={
            **metrics,
            "export_max_abs_diff": variant.export["max_abs_diff"],
            "size_bytes": variant.path.stat().st_size,
        },
        data_fingerprint=parent.data_fingerprint,
        parent=parent.ref,
    )


def load_edge_predictor(
    version: ModelVersion, state: dict[str, Any], *, threads: int | None = None
) -> MedicalPredictor:
    """The calibrated predictor of a registered ``medical-edge`` version (its export on :class:`LiteModel`)."""
    from core.lite import LiteModel

    if version.config.get("kind") != "medical-edge":
        raise ValueError(f"{version.ref} is not a medical edge export (config kind {version.config.get('kind')!r})")
    cal = version.config["calibration"]
    return MedicalPredictor(
        [LiteNet(LiteModel.from_state(version, state, threads=threads))],
        temperature=float(cal["temperature"]),
        bias=float(cal["bias"]),
        train_prior=float(cal["train_prior"]),
        decision_prior=float(cal["decision_prior"]),
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Builds, exports, scores (on ``--split``) and registers every variant; prints one JSON line per variant."""
    from apps.medical.evaluate import predictor_metrics

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="medical@production", help="registry ref of the fine-tuned model")
    ap.add_argument("--registry", type=Path, default=None, help="registry folder (default: $KEEL_HOME/registry)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--prune-rate", type=float, default=EdgeConfig.prune_rate)
    ap.add_argument("--prune-metric", default=EdgeConfig.prune_metric)
    ap.add_argument("--prune-round-to", type=int, default=EdgeConfig.prune_round_to)
    ap.add_argument("--finetune-epochs", type=int, default=EdgeConfig.finetune_epochs)
    ap.add_argument("--finetune-lr", type=float, default=EdgeConfig.finetune_lr)
    ap.add_argument("--qat-epochs", type=int, default=EdgeConfig.qat_epochs)
    ap.add_argument("--data", type=Path, default=None, help="npz scored on (default: the model's training file)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads")
    ap.add_argument("--no-register", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = tuple(v for v in args.variants.split(",") if v)
    tuning = {
        k: getattr(args, k) for k in ("prune_rate", "prune_metric", "finetune_epochs", "finetune_lr", "qat_epochs")
    }
    cfg = EdgeConfig(variants=variants, **tuning)
    registry = ModelRegistry(args.registry)
    version, state = registry.load(args.model)
    recipe = MedicalTrainConfig(**{**version.config["recipe"], "registry_root": None})
    folder = Path(tempfile.mkdtemp(prefix="keel-medical-edge-"))
    built = build_variants(load_predictor(version, state), recipe, cfg, folder, source=version.ref)
    data = args.data or recipe.data_path
    if data is None:
        raise SystemExit(f"{version.ref} records no data path: pass --data FILE.npz")
    scored = load_split(data, args.split)
    out = []
    for v in built:
        metrics = predictor_metrics(v.predictor, scored.images, scored.labels)
        row = {"variant": v.name, **{k: metrics[k] for k in ("auc", "accuracy", "ece", "ece_uncalibrated")}}
        if v.name != "fp32" and not args.no_register:
            scores = {f"{args.split}_{k}": x for k, x in row.items() if k != "variant"}
            row["registered"] = register_variant(registry, v, parent=version, cfg=cfg, metrics=scores).ref
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
