"""Edge export of the PCB detector: ONNX / int8 files for :class:`core.lite.LiteModel`, registered with lineage.

Three variants, each written by :mod:`core.compression.export` and checked there against PyTorch before it is
kept (ONNX Runtime or the TorchScript interpreter runs the written file on a real calibration pair at full size and
on a non-square pair, proving the dynamic batch / height / width axes):

* ``fp32``: the detector as ONNX, run by ONNX Runtime on CPU;
* ``int8`` (the edge default): that ONNX graph statically quantised to int8 by ONNX Runtime (QDQ, per-channel
  weights, MinMax activation ranges calibrated on training pairs), the int8 path that is fast in ONNX Runtime; the
  three 1x1 output convolutions stay fp32 (see :func:`quantize_onnx`);
* ``int8-fx``: :func:`core.compression.quantize_static` (torch FX, x86 int8 kernels, calibrated on the same pairs)
  exported as TorchScript; torch's quantised FX graphs cannot be exported to ONNX.

Calibration pairs come from the training side of the split (board group by default), never the held-out part.
With ``--prune RATE`` the detector is first made smaller: :class:`core.compression.ChannelPruner` removes that
fraction of the channels of every prunable group (ranked by mean activation magnitude on the calibration pairs,
widths kept multiples of 8), then the pruned network is fine-tuned on the training pairs for ``--finetune-s``
seconds with the training recipe (:func:`apps.pcb_inspection.train.fit`), and that model is exported. Pruning
without the fine-tune destroys the detector (25% of channels: mAP@0.5 0.949 -> 0.001).

The export runs through the same :class:`~apps.pcb_inspection.model.PcbPredictor` (input fusion, peak decoding,
score threshold) as the PyTorch model, via :class:`~apps.pcb_inspection.model.LiteDetector`. Run::

    python -m apps.pcb_inspection.edge --model pcb_inspection@production --out /tmp/pcb_edge.onnx
    python -m apps.pcb_inspection.edge --model pcb_gpu_model.pt --variant fp32 --out /tmp/pcb_fp32.onnx
    python -m apps.pcb_inspection.edge --model pcb_gpu_model.pt --prune 0.5 --finetune-s 600 --out /tmp/pcb_p50.onnx

and serve it with ``KEEL_PCB_MODEL_REF=pcb_inspection-edge@production keel serve pcb_inspection``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.pcb_inspection.data import PairRecord, PcbDataset, read_list
from apps.pcb_inspection.model import INPUT_NAME, OUTPUT_NAMES, PcbDetector, PcbDetectorConfig, to_input
from core.compression import ChannelPruner, quantize_static
from core.compression.export import ExportReport, export_onnx, export_torchscript
from core.compression.export import quantize_onnx as core_quantize_onnx
from core.lite import LiteModel
from core.lite.artifact import architecture_for, artifact_state
from core.registry import ModelRegistry, ModelVersion
from core.utils.registry import Registry

__all__ = [
    "EXPORTERS",
    "EdgeExport",
    "SourceModel",
    "calibration_inputs",
    "export_edge",
    "load_source",
    "main",
    "prune_detector",
    "quantize_onnx",
    "register_edge",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceModel:
    """The fp32 detector an export is made from: the model, its score threshold and where it came from."""

    model: PcbDetector
    score_threshold: float
    source: str  # a registry ref or a file path
    parent: str | None  # the registry ref, for lineage (None for a weights file)
    data_fingerprint: str | None = None


@dataclass(frozen=True)
class EdgeExport:
    """One written, checked export.

    Attributes:
        variant: ``fp32``, ``int8`` or ``int8-fx``.
        path: the file (``.onnx`` or ``.pt``).
        format: ``onnx`` or ``torchscript``.
        parity: core's check of the exported graph against PyTorch (the fp32 graph for ``int8``; the quantised FX
            graph for ``int8-fx``).
        score_max_abs_diff: largest difference of the heatmap scores (sigmoid) from the fp32 PyTorch model on the
            check pairs: what quantisation costs before decoding (0-ish for ``fp32``).
    """

    variant: str
    path: Path
    format: str
    parity: ExportReport
    score_max_abs_diff: float

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def to_dict(self) -> dict[str, Any]:
        # the parity report's own path and size are those of the checked graph (a temporary fp32 file for int8)
        parity = {k: v for k, v in self.parity.to_dict().items() if k not in ("path", "size_bytes")}
        return {**self.__dict__, "path": str(self.path), "size_bytes": self.size_bytes, "parity": parity}


Exporter = Callable[..., ExportReport]
#: Variant name -> ``(model, path, *, example, checks, calibration) -> parity report``; each writes ``path``.
EXPORTERS: Registry[Exporter] = Registry("pcb edge export variant")
_SUFFIX = {"fp32": ".onnx", "int8": ".onnx", "int8-fx": ".pt"}
_AXES = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}


def _onnx(model: PcbDetector, path: Path, example: torch.Tensor, checks: Sequence[torch.Tensor]) -> ExportReport:
    return export_onnx(model, (example,), path, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                       dynamic_axes=_AXES, check_inputs=[(c,) for c in checks], source="PcbDetector")  # fmt: skip


@EXPORTERS.register("fp32")
def _fp32(model: PcbDetector, path: Path, *, example: torch.Tensor, checks: Sequence[torch.Tensor],
          calibration: Sequence[torch.Tensor]) -> ExportReport:  # fmt: skip
    del calibration  # nothing to calibrate
    return _onnx(model, path, example, checks)


@EXPORTERS.register("int8")
def _int8_ort(model: PcbDetector, path: Path, *, example: torch.Tensor, checks: Sequence[torch.Tensor],
              calibration: Sequence[torch.Tensor]) -> ExportReport:  # fmt: skip
    """fp32 ONNX (checked against PyTorch), then :func:`quantize_onnx`."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        parity = _onnx(model, fp32, example, checks)
        quantize_onnx(fp32, path, calibration=calibration)
    return parity


def quantize_onnx(src: Path | str, dst: Path | str, *, calibration: Sequence[torch.Tensor]) -> None:
    """ONNX Runtime static int8 of an fp32 detector export (:func:`core.compression.quantize_onnx`), calibrated on
    ``calibration`` ((1, 2, H, W) inputs), with the three 1x1 output convolutions kept fp32: quantising them costs
    0.011 mAP@0.5 on the held-out pairs (the heatmap logits' range is wide and their peaks are what decoding ranks),
    and in fp32 they cost almost no time (64 -> 10 channels at stride 4).
    """
    core_quantize_onnx(
        src,
        dst,
        calibration=[{INPUT_NAME: x.numpy()} for x in calibration],
        keep_fp32=[f"{head}.weight" for head in ("heatmap", "size", "offset")],
    )


@EXPORTERS.register("int8-fx")
def _int8_fx(model: PcbDetector, path: Path, *, example: torch.Tensor, checks: Sequence[torch.Tensor],
             calibration: Sequence[torch.Tensor]) -> ExportReport:  # fmt: skip
    """core's static int8 (torch FX), exported as TorchScript (quantised FX graphs do not export to ONNX)."""
    quantized = quantize_static(model, calibration_data=list(calibration), example_input=example)
    checked = [(c,) for c in checks]
    return export_torchscript(quantized, (example,), path, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=_AXES, check_inputs=checked, source="PcbDetector int8")  # fmt: skip


def calibration_inputs(records: Sequence[PairRecord], *, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` whole pairs drawn at random from ``records`` as (1, 2, H, W) model inputs (template present)."""
    if not records:
        raise ValueError("no pairs to calibrate on: the list's training part is empty")
    order = np.random.default_rng(seed).permutation(len(records))[:n]
    data = PcbDataset([records[i] for i in order])
    return [to_input(torch.from_numpy(data.pair(i))[None], torch.ones(1, dtype=torch.bool)) for i in range(len(data))]


def prune_detector(
    model: PcbDetector,
    train_records: Sequence[PairRecord],
    *,
    rate: float,
    finetune_s: float,
    calibration: Sequence[torch.Tensor],
    lr: float = 1e-3,
    same_pair: float = 0.25,
    metric: str = "activation_magnitude",
    seed: int = 0,
) -> tuple[PcbDetector, dict[str, Any]]:
    """Channel-prunes ``model`` (left unchanged) by ``rate`` and fine-tunes the result on ``train_records``.

    Args:
        model: the trained fp32 detector.
        train_records: the training side of the split (never the held-out pairs).
        rate: fraction of each prunable group's channels to remove, in (0, 1).
        finetune_s: wall-clock seconds of fine-tuning (warm-up + cosine learning rate over them).
        calibration: (1, 2, H, W) inputs the channels are ranked on (see :func:`calibration_inputs`).
        lr: peak learning rate of the fine-tune.
        same_pair: share of fine-tuning items whose template is their own test image (``PcbTrainConfig.same_pair``):
            the fine-tune keeps the detector comparing with the template instead of falling back on looks.
        metric: a :data:`core.compression.pruning.channel.PRUNING_METRICS` name without labels.
        seed: of the fine-tune's crops and shuffling.

    Returns:
        ``(pruned detector in eval mode, statistics)``: parameters before and after, and the fine-tune's run.
    """
    from apps.pcb_inspection.train import PcbTrainConfig, fit
    from core.compression.report import count_parameters

    if not 0.0 < rate < 1.0:
        raise ValueError(f"the pruning rate must be in (0, 1), got {rate}")
    if finetune_s <= 0:
        raise ValueError(f"finetune_s must be > 0 (a pruned detector is useless untrained), got {finetune_s}")
    if not calibration:
        raise ValueError("prune_detector needs calibration inputs to rank channels on")
    example = calibration[0][..., :128, :128]
    pruner = ChannelPruner(model.eval(), rate, metric, example_input=example, calibration_data=list(calibration),
                           round_to=8)  # fmt: skip
    pruned = pruner.prune()
    params = lambda m: count_parameters(m)[0]  # noqa: E731
    log.info("pruned %.0f%% of channels: %d -> %d parameters", 100 * rate, params(model), params(pruned))
    cfg = PcbTrainConfig(model=f"pruned-{rate:g}", lr=lr, budget_s=finetune_s, same_pair=same_pair, register_as=None,
                         progress=False, seed=seed)  # fmt: skip
    pruned, run = fit(cfg, list(train_records), model=pruned)
    # the export runs on the CPU with NCHW inputs; the Trainer may leave the model on a GPU or channels-last
    pruned = pruned.cpu().to(memory_format=torch.contiguous_format).eval()
    stats = {
        "rate": rate,
        "metric": metric,
        "round_to": 8,
        "params_before": params(model),
        "params_after": params(pruned),
        "finetune": {
            "seconds": finetune_s,
            "lr": lr,
            "same_pair": same_pair,
            "crop": cfg.crop,
            "batch_size": cfg.batch_size,
            **run,
        },
    }
    return pruned, stats


def _score_diff(model: PcbDetector, lite: LiteModel, checks: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for x in checks:
        with torch.inference_mode():
            want = model.eval()(x)[0].sigmoid()
        got = torch.from_numpy(lite.predict({INPUT_NAME: x.numpy()})[OUTPUT_NAMES[0]]).sigmoid()
        worst = max(worst, float((got - want).abs().max()))
    return worst


def export_edge(
    model: PcbDetector, path: Path | str, *, variant: str, calibration: Sequence[torch.Tensor]
) -> EdgeExport:
    """Exports ``model`` as ``variant`` to ``path`` and checks it (see the module docstring).

    Args:
        model: the fp32 detector (left unchanged).
        path: the file to write; its suffix must be the variant's (``.onnx``, or ``.pt`` for ``int8-fx``).
        variant: a name in :data:`EXPORTERS`.
        calibration: (1, 2, H, W) model inputs from training pairs; the first is also a parity check input.

    Raises:
        ValueError: an unknown variant, a wrong suffix or no calibration input.
        core.compression.export.ExportParityError: the exported graph disagrees with PyTorch.
    """
    exporter, path = EXPORTERS.get(variant), Path(path)
    if path.suffix != _SUFFIX[variant]:
        raise ValueError(f"{path}: the {variant} export is a {_SUFFIX[variant]} file; give --out a name ending in it")
    if not calibration:
        raise ValueError("export_edge needs at least one calibration input")
    model = model.eval()
    first = calibration[0]
    s = max(32, min(first.shape[-2:]) // 64 * 32)  # about half the side, a multiple of the stride 32
    example = torch.cat([first[..., :s, :s]] * 2)  # (2, 2, s, s): sizes >= 2 stay dynamic in torch.export
    checks = [first, calibration[-1][..., :s, :]]  # full size, and another aspect ratio
    report = exporter(model, path, example=example, checks=checks, calibration=calibration)
    diff = _score_diff(model, LiteModel.load(path), checks)
    log.info("%s export %s: %.1f MB, max |score - fp32| %.3g", variant, path, path.stat().st_size / 1e6, diff)
    return EdgeExport(variant, path, report.format, report, diff)


def load_source(model: str, *, registry: ModelRegistry) -> SourceModel:
    """The fp32 detector from a registry ref (``pcb_inspection@3``) or a ``pcb_gpu_model.pt`` weights file."""
    path = Path(model)
    if path.suffix == ".pt" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such weights file")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"net", "state_dict", "score_threshold"} - set(blob) if isinstance(blob, dict) else {"a dict"}
        if missing:
            raise ValueError(f"{path}: not a pcb_gpu_model.pt (lacks {sorted(missing)}); give a registry ref instead")
        net, state, threshold = PcbDetectorConfig(**blob["net"]), blob["state_dict"], float(blob["score_threshold"])
        parent, fingerprint = None, None
    else:
        version, state = registry.load(model)
        if str(version.architecture).startswith("lite."):
            raise ValueError(f"{version.ref} is already an export ({version.architecture}); give its PyTorch parent")
        net, threshold = PcbDetectorConfig(**version.config["net"]), float(version.config.get("score_threshold", 0.3))
        parent, fingerprint = version.ref, version.data_fingerprint
    detector = PcbDetector(net)
    detector.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return SourceModel(detector.eval(), threshold, parent or str(path), parent, fingerprint)


def register_edge(
    registry: ModelRegistry,
    export: EdgeExport,
    src: SourceModel,
    *,
    name: str,
    aliases: Sequence[str] = (),
    calibration: dict[str, Any] | None = None,
    pruning: dict[str, Any] | None = None,
) -> ModelVersion:
    """Registers an export as the next version of ``name``, its parent the source version (lineage).

    Like :func:`core.compression.export.register_export` (the same artifact layout, so
    :meth:`core.lite.LiteModel.from_state` loads it), plus what decoding needs: the architecture config and score
    threshold, read back by :func:`apps.pcb_inspection.model.load_predictor`.
    """
    blob = export.path.read_bytes()
    parity = export.parity
    return registry.register(
        name,
        artifact_state(export.format, blob),
        architecture=architecture_for(export.format),
        config={
            "format": export.format,
            "file": export.path.name,
            **parity.meta.to_dict(),
            "variant": export.variant,
            "net": dataclasses.asdict(src.model.cfg),
            "score_threshold": src.score_threshold,
            "source": src.source,
            "calibration": calibration or {},
            "pruning": pruning,  # None: the source's channels as trained
        },  # fmt: skip
        hparams={"atol": parity.atol, "rtol": parity.rtol},
        metrics={
            "export_max_abs_diff": parity.max_abs_diff,
            "export_max_tol_ratio": parity.max_tol_ratio,
            "score_max_abs_diff_vs_fp32": export.score_max_abs_diff,
            "size_bytes": len(blob),
        },
        data_fingerprint=src.data_fingerprint,
        parent=src.parent,
        aliases=aliases,
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pcb_inspection@production", help="registry ref or pcb_gpu_model.pt file")
    p.add_argument("--out", type=Path, required=True, help="the file to write (.onnx; .pt for int8-fx)")
    p.add_argument("--variant", default="int8", choices=EXPORTERS.names())
    p.add_argument("--list", type=Path, default=None, help="DeepPCB list to calibrate on (default: trainval.txt)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder the list's paths are relative to")
    p.add_argument("--split", default="group", choices=("group", "random", "none"), help="calibrate on its train part")
    p.add_argument("--calibration-pairs", type=int, default=32)
    p.add_argument("--prune", type=float, default=None, metavar="RATE", help="channel-prune by RATE, then fine-tune")
    p.add_argument("--finetune-s", type=float, default=600.0, help="seconds of fine-tuning after --prune")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-same-pair", type=float, default=0.25, help="share of same pairs in the fine-tune")
    p.add_argument("--name", default=None, help="registry name (default: the source's name + '-edge')")
    p.add_argument("--alias", action="append", default=None, help="alias for the export (default: production)")
    p.add_argument("--registry-root", type=Path, default=None)
    p.add_argument("--no-register", action="store_true", help="only write and check the file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The CLI: export, check, register; prints and returns a JSON summary."""
    from apps.pcb_inspection.train import _default_list, split_records

    args = _parse(argv)
    if args.calibration_pairs < 1:
        raise SystemExit("--calibration-pairs must be >= 1")
    registry = ModelRegistry(args.registry_root)
    src = load_source(args.model, registry=registry)
    list_file = args.list or _default_list()
    train_records, _ = split_records(read_list(list_file, args.data_dir), split=args.split, holdout=0.2, seed=0)
    calibration = calibration_inputs(train_records, n=args.calibration_pairs)
    pruning = None
    if args.prune is not None:
        pruned, pruning = prune_detector(src.model, train_records, rate=args.prune, finetune_s=args.finetune_s,
                                         calibration=calibration, lr=args.finetune_lr,
                                         same_pair=args.finetune_same_pair)  # fmt: skip
        pruning.update(split=args.split, list=str(list_file))
        src = dataclasses.replace(src, model=pruned)
    export = export_edge(src.model, args.out, variant=args.variant, calibration=calibration)
    summary: dict[str, Any] = {"export": export.to_dict(), "source": src.source, "pruning": pruning}
    if not args.no_register:
        base = src.parent.partition("@")[0] if src.parent else "pcb_inspection"
        calib = {"list": str(list_file), "split": args.split, "pairs": len(calibration)}
        version = register_edge(registry, export, src, name=args.name or f"{base}-edge",
                                aliases=args.alias or ["production"], calibration=calib,
                                pruning=pruning)  # fmt: skip
        summary.update(registered=version.ref, parent=version.parent)
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    from core.registry import ModelNotFoundError, TamperedArtifactError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError, ModelNotFoundError, TamperedArtifactError) as err:  # DataFormatError too
        raise SystemExit(f"pcb edge export: {err}") from None
