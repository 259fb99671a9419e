"""Length-bucketed dynamic batching against padding to the longest (and no batching), through the lite runtime.

Workload: real, long-tailed sequence lengths: every MovieLens user's rating history (``recsys/ml-latest-small``,
522 users, 16 to 2,516 ratings, median 67), item ids in time order, the last ``--max-len`` kept. A SASRec-style
Transformer encoder over item ids (masked mean-pooled user embedding) is exported to ONNX with
:func:`core.compression.export.export_onnx` (checked against PyTorch), registered with lineage, and served by a
:class:`core.serving.ModelHandle` with :func:`core.lite.sequence_loader` on ONNX Runtime (CPU). The weights are
the freshly initialised ones: throughput does not depend on their values, only on shapes.

Open-loop load (the default): requests arrive as a Poisson process at a fixed rate, whatever the server does, and
each latency counts from the scheduled arrival (no coordinated omission; as Triton's perf_analyzer
``--request-intervals`` / wrk2). The rate climbs until a mode breaks the P99 bound. ``--load closed`` runs ``C``
closed-loop clients instead. Modes, all with the same ``--max-delay-ms``:

- ``unbatched``: one request per model call;
- ``pad-longest/B``: the micro-batcher's batch of up to ``B`` requests, padded to its longest sequence;
- ``fixed-buckets/W``: the same batcher (up to 32) split by ``bucket_key = (len - 1) // W``, each bucket padded to
  its longest (fixed bucket boundaries);
- ``bucketed``: the same batcher collecting up to 256 requests, split by a
  :class:`core.lite.TokenBudgetPlanner` into similar-length groups of at most ``--max-tokens`` padded tokens, the
  cuts chosen to minimise padding plus ``--call-cost`` tokens per model call.

The headline is each mode's highest rate served with P99 latency under ``--p99-ms`` (and every request answered).

    keel bench lite_batching
    keel bench lite_batching --rates 50,100,200,300,400 --duration 4 --p99-ms 250
    keel bench lite_batching --load closed --concurrency 1,8,32,128
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from core.compression.export import export_onnx, register_export  # noqa: E402
from core.lite import LiteModel, SequencePredictor, TokenBudgetPlanner, sequence_loader  # noqa: E402
from core.registry import ModelRegistry  # noqa: E402
from core.serving import ModelHandle  # noqa: E402

PAD = 0


class SeqEncoder(nn.Module):
    """SASRec-style encoder: item + position embeddings, pre-norm Transformer layers, masked mean pooling."""

    def __init__(self, n_items: int, *, d_model: int, heads: int, layers: int, max_len: int) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, d_model, padding_idx=PAD)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        pad = items == PAD  # (B, T)
        x = self.items(items) + self.pos(torch.arange(items.shape[1], device=items.device))[None]  # (B, T, C)
        x = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.out((x * keep).sum(1) / keep.sum(1).clamp(min=1.0))  # (B, C)


def user_histories(ratings_csv: Path, max_len: int) -> tuple[list[np.ndarray], int, np.ndarray]:
    """Per-user item-id sequences in time order (last ``max_len`` kept), the item count, and the raw lengths."""
    import pandas as pd

    df = pd.read_csv(ratings_csv, usecols=["userId", "movieId", "timestamp"]).sort_values(["userId", "timestamp"])
    ids, _ = pd.factorize(df["movieId"])
    df["item"] = ids + 1  # 0 is padding
    seqs = [g.to_numpy(dtype=np.int64) for _, g in df.groupby("userId")["item"]]
    raw = np.array([len(s) for s in seqs])
    return [s[-max_len:] for s in seqs], int(ids.max()) + 1, raw


@dataclass(frozen=True)
class Mode:
    name: str
    max_batch_size: int
    planner: TokenBudgetPlanner | None
    pad_multiple: int
    bucket_width: int | None = None  # fixed-width length buckets (the serving batcher's bucket_key)


async def closed_loop(handle: ModelHandle, seqs: list[np.ndarray], *, level: float, duration_s: float) -> dict:
    """``level`` closed-loop clients for ``duration_s``: each sends its next request once the previous is answered."""
    rng = np.random.default_rng(int(level))
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration_s

    async def client(order: np.ndarray) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            seq = seqs[order[i % len(order)]]
            i += 1
            t0 = time.perf_counter()
            await handle.predict(seq)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client(rng.permutation(len(seqs))) for _ in range(int(level))))
    return _summary(latencies, unanswered=0, elapsed=time.perf_counter() - start)


async def open_loop(handle: ModelHandle, seqs: list[np.ndarray], *, level: float, duration_s: float) -> dict:
    """Poisson arrivals at ``level`` requests/s for ``duration_s``; latency counted from each scheduled arrival.

    Requests still unanswered 2 s after the last arrival are cancelled and counted as failures (an overloaded mode
    would otherwise drain its backlog for minutes).
    """
    rng = np.random.default_rng(int(level))
    arrivals = np.cumsum(rng.exponential(1.0 / level, size=max(1, int(level * duration_s))))
    picks = rng.integers(0, len(seqs), size=len(arrivals))
    latencies: list[float] = []
    start = time.perf_counter()

    async def one(at: float, seq: np.ndarray) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        await handle.predict(seq)
        latencies.append(time.perf_counter() - start - at)

    tasks = [asyncio.create_task(one(float(at), seqs[i])) for at, i in zip(arrivals, picks, strict=True)]
    _, pending = await asyncio.wait(tasks, timeout=float(arrivals[-1]) + 2.0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return _summary(latencies, unanswered=len(pending), elapsed=max(time.perf_counter() - start, float(arrivals[-1])))


def _summary(latencies: list[float], *, unanswered: int, elapsed: float) -> dict:
    lat_ms = np.array(latencies or [float("inf")]) * 1000
    total = len(latencies) + unanswered
    return {
        "requests": total,
        "unanswered": unanswered,
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        # unanswered requests count as infinitely late ("higher": no interpolation between inf and a number)
        "p99_ms": float(np.percentile(np.concatenate([lat_ms, np.full(unanswered, np.inf)]), 99, method="higher")),
    }


async def run_mode(
    mode: Mode, registry: ModelRegistry, seqs: list[np.ndarray], args: argparse.Namespace, *, level: float
) -> dict:
    predictors: list[SequencePredictor] = []
    load = sequence_loader(threads=args.threads, pad_value=PAD, pad_multiple=mode.pad_multiple)

    def tracked(version: Any, state: Any) -> SequencePredictor:
        predictors.append(load(version, state))
        return predictors[-1]

    handle = ModelHandle(
        registry,
        "seq-onnx@production",
        load=tracked,
        max_batch_size=mode.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        plan=mode.planner,
        bucket_key=None if mode.bucket_width is None else functools.partial(fixed_bucket, width=mode.bucket_width),
        reload_interval_s=0,
    )
    await handle.start()
    try:
        await handle.predict_many(seqs[:8])  # warm-up: first ORT runs allocate
        stats = predictors[-1].stats
        calls, real, padded = stats.calls, stats.real_tokens, stats.padded_tokens
        drive = open_loop if args.load == "open" else closed_loop
        row = await drive(handle, seqs, level=level, duration_s=args.duration)
        calls, real, padded = stats.calls - calls, stats.real_tokens - real, stats.padded_tokens - padded
    finally:
        await handle.stop()
    answered = row["requests"] - row["unanswered"]
    return {
        "mode": mode.name,
        "rate" if args.load == "open" else "clients": level,
        **row,
        "mean_batch": answered / max(calls, 1),
        "padding_efficiency": real / max(padded, 1),
    }


def fixed_bucket(seq: np.ndarray, *, width: int) -> int:
    return (len(seq) - 1) // width


def export_model(work: Path, n_items: int, seqs: list[np.ndarray], args: argparse.Namespace) -> ModelRegistry:
    torch.manual_seed(0)
    model = SeqEncoder(n_items, d_model=args.d_model, heads=4, layers=args.layers, max_len=args.max_len).eval()
    registry = ModelRegistry(work / "registry")
    parent = registry.register(
        "seq",
        model.state_dict(),
        architecture="seq_encoder",
        config={"n_items": n_items, "d_model": args.d_model, "layers": args.layers, "max_len": args.max_len},
    )

    def batch(idx: list[int]) -> tuple[torch.Tensor]:
        from core.lite import pad_batch

        return (torch.from_numpy(pad_batch([seqs[i] for i in idx], pad_value=PAD)[0]),)

    by_len = np.argsort([len(s) for s in seqs])
    report = export_onnx(
        model,
        batch([int(by_len[0]), int(by_len[len(seqs) // 2])]),
        work / "seq.onnx",
        input_names=["items"],
        output_names=["user_embedding"],
        dynamic_axes={"items": {0: "batch", 1: "seq"}},
        check_inputs=[batch([int(by_len[-1])]), batch([int(i) for i in by_len[::40]])],
        source=parent.ref,
    )
    print(
        f"exported {parent.ref} to ONNX: {report.size_bytes / 1e6:.1f} MB, max |ORT - torch| {report.max_abs_diff:.2e} "
        f"on shapes {report.checked_shapes}",
        file=sys.stderr,
    )
    register_export(registry, report, name="seq-onnx", parent=parent.ref, aliases=["production"])
    return registry


def sweep(modes: list[Mode], registry: ModelRegistry, seqs: list[np.ndarray], args: argparse.Namespace) -> list[dict]:
    """Every mode at every load level, modes interleaved (background load on a shared box hits all alike); a mode
    is dropped after two levels in a row over the P99 bound (in open loop, more load only makes it worse)."""
    levels = [float(x) for x in (args.rates if args.load == "open" else args.concurrency).split(",")]
    strikes = dict.fromkeys((m.name for m in modes), 0)
    runs = []
    for level in levels:
        for repeat in range(args.repeats):
            for mode in modes:
                if args.load == "open" and strikes[mode.name] >= 2:
                    continue
                runs.append({"repeat": repeat, **asyncio.run(run_mode(mode, registry, seqs, args, level=level))})
                print(f"  {runs[-1]}", file=sys.stderr)
        for mode in modes:
            mine = [r for r in runs if r["mode"] == mode.name and level in (r.get("rate"), r.get("clients"))]
            if mine:
                over = np.median([r["p99_ms"] for r in mine]) > bounds(args)[-1]
                strikes[mode.name] = strikes[mode.name] + 1 if over else 0
    return runs


def medians(runs: list[dict]) -> list[dict]:
    """One row per (mode, load level): the median of every measured field over the repeats."""
    level_key = "rate" if "rate" in runs[0] else "clients"
    keys = list(dict.fromkeys((r["mode"], r[level_key]) for r in runs))
    rows = []
    for mode, level in keys:
        group = [r for r in runs if r["mode"] == mode and r[level_key] == level]
        fields = [k for k in group[0] if k not in ("mode", level_key, "repeat")]
        rows.append({"mode": mode, level_key: level, **{k: float(np.median([r[k] for r in group])) for k in fields}})
    return rows


def bounds(args: argparse.Namespace) -> list[float]:
    return sorted(float(b) for b in args.p99_ms.split(","))


def headline(rows: list[dict], modes: list[str], bound_ms: float) -> dict:
    """Each mode's highest served rate within the bound, and bucketed's ratio to the best padded one."""
    rate = {}
    for mode in modes:
        ok = [r["rps"] for r in rows if r["mode"] == mode and r["p99_ms"] <= bound_ms and r["unanswered"] == 0]
        rate[mode] = max(ok, default=0.0)
    pad_best = max(v for k, v in rate.items() if k.startswith("pad-longest"))
    return {
        "p99_bound_ms": bound_ms,
        **rate,
        "bucketed_vs_pad_longest": rate["bucketed"] / pad_best if pad_best else float("inf"),
        "bucketed_vs_unbatched": rate["bucketed"] / rate["unbatched"] if rate["unbatched"] else float("inf"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="MovieLens ratings.csv (default: the shared dev copy)")
    ap.add_argument("--max-len", type=int, default=512, help="longest history kept (the model's context)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--max-delay-ms", type=float, default=0.0, help="batcher max delay, the same for every mode")
    ap.add_argument("--max-tokens", type=int, default=2048, help="token budget per bucketed model call")
    ap.add_argument("--call-cost", default="auto", help="planner's cost of one model call in tokens, or 'auto'")
    ap.add_argument("--pad-batch-sizes", default="8,32", help="batch sizes tried for padding to the longest")
    ap.add_argument("--bucket-width", type=int, default=64, help="width of the fixed length buckets compared")
    ap.add_argument("--load", choices=("open", "closed"), default="open", help="Poisson arrivals or closed loop")
    ap.add_argument("--rates", default="50,60,75,100,125,150,200,250,300,350,400", help="open loop: requests per s")
    ap.add_argument("--concurrency", default="1,8,32,128", help="closed loop: client counts")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per load level")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every (mode, level), interleaved; medians kept")
    ap.add_argument(
        "--p99-ms", default="100,250,500", help="P99 latency bounds for the headline (the last: sweep stop)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from core.config import data_dir

    ratings = args.data or (data_dir() or Path("../shared/data")) / "recsys" / "ml-latest-small" / "ratings.csv"
    seqs, n_items, raw = user_histories(ratings, args.max_len)
    lengths = np.array([len(s) for s in seqs])
    workload = {
        "data": str(ratings),
        "users": len(seqs),
        "raw_lengths": {q: int(np.percentile(raw, p)) for q, p in (("min", 0), ("p50", 50), ("p90", 90), ("max", 100))},
        "served_lengths": {"mean": float(lengths.mean()), "p50": int(np.median(lengths)), "max": int(lengths.max())},
    }
    print(f"workload: {workload}", file=sys.stderr)
    modes = [Mode("unbatched", 1, None, 1)]
    modes += [Mode(f"pad-longest/{b}", b, None, 1) for b in map(int, args.pad_batch_sizes.split(","))]
    modes.append(Mode(f"fixed-buckets/{args.bucket_width}", 32, None, 1, bucket_width=args.bucket_width))
    with tempfile.TemporaryDirectory(prefix="keel-lite-bench-") as tmp:
        registry = export_model(Path(tmp), n_items, seqs, args)
        if args.call_cost == "auto":
            lite = LiteModel.from_registry(registry, "seq-onnx@production", threads=args.threads)
            args.call_cost = SequencePredictor(lite, pad_value=PAD, pad_multiple=8).measure_call_cost(seqs)
            print(f"measured call cost: {args.call_cost:.1f} tokens", file=sys.stderr)
        planner = TokenBudgetPlanner(max_tokens=args.max_tokens, pad_multiple=8, call_cost=float(args.call_cost))
        modes.append(Mode("bucketed", 256, planner, 8))
        runs = sweep(modes, registry, seqs, args)
    rows = medians(runs)
    what = "Poisson arrivals (rate = requests/s)" if args.load == "open" else "closed-loop clients"
    print_table(f"Lite runtime, MovieLens user histories, {what}, median of {args.repeats}", rows)
    summary = [headline(rows, [m.name for m in modes], bound) for bound in bounds(args)]
    print_table("Highest throughput with every request answered and P99 under the bound", summary)
    settings = {k: v for k, v in vars(args).items() if k != "data"}
    write_json(
        "lite_batching",
        {
            "workload": workload,
            "settings": settings,
            "load_avg": os.getloadavg(),
            "summary": summary,
            "rows": rows,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
