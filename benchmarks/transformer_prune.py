"""Structured pruning of a BERT-style Transformer encoder to <= 30% of its parameters (issue #4, item 2).

The encoder (``_movielens.MovieEncoder``: movie + rating + genre embeddings, pre-norm
``nn.TransformerEncoder``, 2-way head) reads a user's last ``--history`` MovieLens ratings and predicts
whether they like the next movie they rate (rating >= 4); metric ROC-AUC on the later 20% (by time) of
the dev ratings. The teacher is trained through ``core.training.Trainer``; then
``core.compression.pruning.transformer.prune_transformer`` prunes it along ``--schedule`` (fractions of
the teacher's parameters: attention heads, FFN neurons and the hidden size, ranked by Taylor scores on
``--calib-batches`` training batches), distilling from the unpruned teacher for ``--distill-epochs`` on
``--distill-samples`` random training samples after every step. Rows are reported at the ``--report``
fractions: parameters (all, embeddings included), size on disk, CPU latency at batch 1 and 32
(``--threads`` threads, best of ``--repeats``), ROC-AUC and its fraction of the teacher's.

    keel bench transformer_prune                                  # CPU settings (~3 min idle, ~11 min busy)
    keel bench transformer_prune --train-samples 2048 --epochs 1 --schedule 0.5 --report 0.5 --out smoke
    # the brief's BERT-style size (d=256, 8 heads, 3.9M parameters) on a GPU, a few minutes:
    keel bench transformer_prune --device cuda --d-model 256 --heads 8 --ffn 1024 --history 16 --epochs 4 \\
        --batch-size 256 --lr 1e-3 --warmup-steps 100 --distill-epochs 2 --distill-samples 0 --distill-lr 5e-4 \\
        --schedule 0.7,0.5,0.4,0.3,0.2 --out transformer_prune_gpu
"""

from __future__ import annotations

import argparse
import copy
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
from _movielens import MovieEncoder, MovieEncoderConfig, load_task, roc_auc  # noqa: E402

from core.compression.pruning import convert, prune_transformer  # noqa: E402
from core.compression.pruning.encoder import encoder_layers  # noqa: E402
from core.compression.report import count_parameters, size_on_disk  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None, help="default: KEEL_DATA_DIR")
    p.add_argument("--history", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1, help="teacher training epochs")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--train-samples", type=int, default=None, help="first N training samples (smoke runs)")
    p.add_argument("--schedule", default="0.5,0.3,0.2", help="prune-then-distil steps (fractions)")
    p.add_argument("--report", default="0.5,0.3,0.2", help="schedule fractions that get a table row")
    p.add_argument("--distill-epochs", type=int, default=1)
    p.add_argument("--distill-samples", type=int, default=16000, help="random training samples per step (0: all)")
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label loss in distillation")
    p.add_argument("--drop-layers", type=int, default=0, help="layers removed at the first step")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu or cuda (training); latency is always on CPU")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the control: the teacher trained further on the students' extra samples",
    )
    p.add_argument("--out", default="transformer_prune")
    return p.parse_args(argv)


def trainer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from core.training.speed import SpeedConfig

    precision = "32-true" if args.device == "cpu" else "auto"
    # no torch.compile: the models are deep-copied, converted and pruned between runs
    return {"precision": precision, "accelerator": args.device, "progress": False, "seed": args.seed,
            "speed": SpeedConfig(compile=False)}  # fmt: skip


def structure(model: nn.Module) -> dict[str, Any]:
    layers = list(encoder_layers(model).values())
    return {
        "d_model": layers[0].linear2.out_features,
        "heads": [m.self_attn.num_heads for m in layers],
        "ffn": [m.linear1.out_features for m in layers],
    }


def row(name: str, model: nn.Module, auc: float, *, teacher_params: int, teacher_auc: float) -> dict:
    model = model.cpu().eval()
    params, _ = count_parameters(model)
    raw, _ = size_on_disk(model)
    return {
        "model": name,
        "params": params,
        "fraction": params / teacher_params,
        "size_MB": raw / 1e6,
        "lat_b1_ms": None,  # filled by round_robin_latency
        "lat_b32_ms": None,
        "roc_auc": auc,
        "auc_vs_teacher": auc / teacher_auc,
    }


@torch.inference_mode()
def round_robin_latency(models: list[nn.Module], x: torch.Tensor, *, repeats: int) -> list[dict[int, float]]:
    """Best-of-``repeats`` forward time (ms) at batch 1 and 32 for each model, timing the models in turn so
    load from other jobs on the machine hits all of them alike."""
    batches = {bs: x.repeat(bs, *([1] * (x.ndim - 1))) for bs in (1, 32)}
    best: list[dict[int, float]] = [{1: float("inf"), 32: float("inf")} for _ in models]
    for m in models:
        m.cpu().eval()(batches[32])  # warm-up
    for _ in range(repeats):
        for i, m in enumerate(models):
            for bs, xb in batches.items():
                t0 = time.perf_counter()
                m(xb)
                best[i][bs] = min(best[i][bs], (time.perf_counter() - t0) * 1e3)
    return best


def train_teacher(task: Any, train: TensorDataset, args: argparse.Namespace) -> nn.Module:
    from core.training import Trainer

    torch.manual_seed(args.seed)
    cfg = MovieEncoderConfig(task.n_tokens, args.history, args.d_model, args.heads, args.layers, args.ffn)
    model = MovieEncoder(cfg)
    Trainer(
        model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), lr=args.lr, warmup_steps=args.warmup_steps,
        **trainer_kwargs(args),
    ).train(train, epochs=args.epochs, batch_size=args.batch_size)  # fmt: skip
    return model.cpu().eval()


def train_further(teacher: nn.Module, train: TensorDataset, pick: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    from core.training import Trainer

    model = copy.deepcopy(teacher).train()
    data = TensorDataset(train.tensors[0][pick], train.tensors[1][pick])
    Trainer(
        model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), lr=args.distill_lr, **trainer_kwargs(args)
    ).train(data, epochs=args.distill_epochs, batch_size=args.batch_size)
    return model.cpu().eval()


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    from core.config import data_dir

    root = args.data_dir or data_dir()
    if root is None:
        raise SystemExit("no real-data folder: pass --data-dir or set KEEL_DATA_DIR (see ../shared/data/README.md)")
    task = load_task(root, history=args.history)
    n = args.train_samples or len(task.train_y)
    train = TensorDataset(task.train_x[:n], task.train_y[:n])
    val = list(zip(task.val_x.split(512), task.val_y.split(512), strict=True))
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n, generator=g)[: 128 * args.calib_batches]
    calib = list(zip(task.train_x[order].split(128), task.train_y[order].split(128), strict=True))
    args.example = task.val_x[:1]
    print(f"train {n} samples, val {len(task.val_y)} (targets rated after {task.cut_timestamp})", file=sys.stderr)

    t0 = time.perf_counter()
    teacher = train_teacher(task, train, args)
    seconds = {"teacher": time.perf_counter() - t0}
    t_auc = roc_auc(teacher, val)
    t_params = count_parameters(teacher)[0]
    kw = {"teacher_params": t_params, "teacher_auc": t_auc}
    rows = [row("teacher (nn.TransformerEncoderLayer)", teacher, t_auc, **kw)]
    timed: list[nn.Module] = [teacher]
    converted = convert(copy.deepcopy(teacher)).eval()
    rows.append(row("teacher, converted (PrunableEncoderLayer)", converted, roc_auc(converted, val), **kw))
    timed.append(converted)
    structures = {"teacher": structure(converted)}
    report = {float(f) for f in args.report.split(",")}
    student: nn.Module = converted
    steps: list[dict[str, Any]] = []
    extra: list[torch.Tensor] = []  # the samples each step distils on
    for frac in (float(f) for f in args.schedule.split(",")):
        t0 = time.perf_counter()
        current = count_parameters(student)[0] / t_params
        k = args.distill_samples or n
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + len(steps) + 1))[:k]
        subset = TensorDataset(train.tensors[0][pick], train.tensors[1][pick])
        extra.append(pick)
        student = prune_transformer(
            student, target=frac / current, steps=1, teacher=teacher, calibration_data=calib, train_data=subset,
            epochs=args.distill_epochs, drop_layers=args.drop_layers if not steps else 0, example_input=args.example,
            temperature=args.temperature, alpha=args.alpha, lr=args.distill_lr, batch_size=args.batch_size,
            **trainer_kwargs(args),
        ).cpu().eval()  # fmt: skip
        auc = roc_auc(student, val)
        step = {"target": frac, "fraction": count_parameters(student)[0] / t_params, "roc_auc": auc,
                "seconds": time.perf_counter() - t0, **structure(student)}  # fmt: skip
        steps.append(step)
        print(f"step {frac}: {step}", file=sys.stderr)
        if frac in report:
            rows.append(row(f"pruned to {frac:.0%} + distilled", student, auc, **kw))
            timed.append(copy.deepcopy(student))
            structures[f"{frac}"] = structure(student)
    if args.control:  # is the teacher short of training? give it the students' extra samples too (hard labels)
        control = train_further(teacher, train, torch.cat(extra), args)
        rows.append(row("control: teacher trained on the same extra samples", control, roc_auc(control, val), **kw))
        timed.append(control)
    for r, lat in zip(rows, round_robin_latency(timed, args.example, repeats=args.repeats), strict=True):
        r["lat_b1_ms"], r["lat_b32_ms"] = lat[1], lat[32]
    print_table(f"Transformer pruning, MovieLens next-like ROC-AUC ({args.threads} CPU threads)", rows)
    settings = {k: v for k, v in vars(args).items() if k != "example"}
    settings["data_dir"] = str(root)
    write_json(args.out, {
        "command": "keel bench transformer_prune " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": settings, "train_samples": n, "val_samples": len(task.val_y), "rows": rows, "steps": steps,
        "structures": structures, "seconds": {**seconds, "pruning": sum(s["seconds"] for s in steps)},
    })  # fmt: skip


if __name__ == "__main__":
    main()
