"""Gradient compression on 2 and 4 CPU processes: bytes on the wire, step time and final loss per hook.

Every hook trains the same MLP (784-512-256-2, 534k parameters) on the real PneumoniaMNIST
development images with Keel's ``Trainer(strategy="ddp", compression=...)`` under torchrun, from the
same weights, data order and global batch. The final loss is the training objective (cross-entropy
on all 4,708 training images after the last step, the loss the optimiser minimises); the cross-entropy
and accuracy on the 524 held-out validation images are reported next to it. ``local`` is a
benchmark-only hook that communicates nothing: the step time of pure compute, from which each hook's
communication overhead is measured. The alpha-beta cost model
(``core.distributed.cost_model``), fed with all-reduce timings measured in the same process group and
the measured codec cost, predicts each overhead; predicted and measured sit side by side.

    keel bench compression                          # 2 and 4 processes, 6 epochs each (~10 min on 2 busy cores)
    keel bench compression --worlds 2 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import print_table, write_json  # noqa: E402

from core.distributed.cost_model import Workload, estimate, fit_alpha_beta  # noqa: E402

# "none@order1": uncompressed again with another data order, the task's own run-to-run spread.
HOOKS = ("local", "none", "none@order1", "fp16", "bf16", "int8", "powersgd")
GLOBAL_BATCH, LR = 64, 2e-3
ALLREDUCE_SIZES = (2**16, 2**18, 2**20, 2**21, 2**22)  # bytes


def load_pneumonia(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with np.load(path) as d:
        arrays = [d[k] for k in ("train_images", "train_labels", "val_images", "val_labels")]
    xs = [torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0) for a in arrays[0::2]]
    ys = [torch.from_numpy(a.reshape(-1).astype(np.int64)) for a in arrays[1::2]]
    return xs[0], ys[0], xs[1], ys[1]


# ---------------------------------------------------------------- worker (one process of a torchrun group)


def _register_local_hook() -> None:
    """``local``: hand back the local gradient, no communication (the compute-only baseline)."""
    from core.distributed.hooks import COMPRESSIONS, CommHook
    from core.distributed.wire import CommState

    def hook(state, bucket):  # type: ignore[no-untyped-def]  # string annotations would fail DDP's check
        state.count(0, bucket.buffer().numel())
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    if "local" not in COMPRESSIONS:
        COMPRESSIONS.add("local", lambda *, process_group=None: CommHook("local", CommState(process_group), hook))


def _median_time(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_network(world: int) -> list[tuple[int, float]]:
    import torch.distributed as dist

    points = []
    for nbytes in ALLREDUCE_SIZES:
        t = torch.ones(nbytes // 4)
        dist.barrier()
        points.append((nbytes, _median_time(lambda t=t: dist.all_reduce(t), reps=9)))
    return points


def measure_codecs(n: int, world: int) -> dict[str, float]:
    """Seconds per gradient element each hook spends on arithmetic (no communication), for the cost model."""
    from core.distributed.int8 import Int8State, decode, encode, owner_reduce, segment_size

    x = torch.randn(n)
    out = torch.empty_like(x)
    state = Int8State(chunk=256)
    seg = segment_size(n, world, 256)

    def int8() -> None:  # the hook's three compute stages; the owner stage sees a whole received buffer
        send = encode(state, x, world=world, key=(0,), index=0)
        row = owner_reduce(state, send, world=world, seg=seg, key=(0,), index=0)
        decode(row.repeat(world), world=world, seg=seg, chunk=256, n=n)

    def cast(dtype: torch.dtype) -> Any:
        return lambda: out.copy_((x / world).to(dtype))

    fns = {"none": cast(torch.float32), "fp16": cast(torch.float16), "bf16": cast(torch.bfloat16), "int8": int8}
    return {k: _median_time(f, reps=7) / n for k, f in fns.items()}


def train_one(label: str, data: tuple[torch.Tensor, ...], *, world: int, rank: int, epochs: int) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from core.training import Trainer

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            self.times.append(time.perf_counter() - self._t0)
            loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach().clone()
            dist.all_reduce(loss)
            self.losses.append(float(loss) / world)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 2))
    xtr, ytr, xva, yva = data
    train = TensorDataset(xtr, ytr)
    hook, _, order = label.partition("@order")
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=int(order or 0))
    loader = DataLoader(train, batch_size=GLOBAL_BATCH // world, sampler=sampler, drop_last=True)
    rec = Recorder()
    trainer = Trainer(
        net,
        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        precision="32-true",
        lr=LR,
        max_epochs=epochs,
        devices=world,
        strategy="ddp",
        compression=hook,
        accelerator="cpu",
        progress=False,
        log_every_n_steps=50,
        callbacks=[rec],
    )
    trainer.train(loader)
    with torch.no_grad():
        val_logits, train_loss = net(xva), float(F.cross_entropy(net(xtr), ytr))
    steps = len(rec.times)
    assert trainer.comm is not None
    per_epoch = steps // epochs
    return {
        "hook": label,
        "steps": steps,
        "step_ms": 1000 * statistics.median(rec.times[5:]),
        "bytes_per_step": trainer.comm.state.bytes_sent / steps,
        "ratio_vs_fp32": trainer.comm.state.ratio if hook != "local" else None,
        "train_loss_last_epoch": statistics.fmean(rec.losses[-per_epoch:]),
        "final_train_loss": train_loss,
        "val_loss": float(F.cross_entropy(val_logits, yva)),
        "val_accuracy": float((val_logits.argmax(1) == yva).float().mean()),
        "params": sum(p.numel() for p in net.parameters()),
    }


def worker(out: Path, data_path: Path, epochs: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # Lightning reuses it; the network timings below share it
    world, rank = dist.get_world_size(), dist.get_rank()
    _register_local_hook()
    data = load_pneumonia(data_path)
    runs = [train_one(h, data, world=world, rank=rank, epochs=epochs) for h in HOOKS]
    result = {
        "world": world,
        "allreduce_points": measure_network(world),
        "codec_s_per_element": measure_codecs(runs[0]["params"], world),
        "runs": runs,
    }
    if rank == 0:
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


# ---------------------------------------------------------------- driver


def launch(world: int, *, data_path: Path, epochs: int, tmp: Path, timeout_s: float) -> dict[str, Any]:
    out = tmp / f"world{world}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd += [__file__, "--worker", "--out", str(out), "--data", str(data_path), "--epochs", str(epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KEEL_HOME": str(tmp / "home"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(f"world {world}: no result within {timeout_s:.0f} s") from None
    if proc.returncode:
        raise SystemExit(f"world {world} failed:\n{err[-3000:]}")
    return json.loads(out.read_text())


def summarise(res: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of measured vs predicted overhead for one world size."""
    world = res["world"]
    net = fit_alpha_beta(res["allreduce_points"], world)
    runs = {r["hook"]: r for r in res["runs"]}
    local, none = runs["local"], runs["none"]
    rows = []
    for hook, r in runs.items():
        if hook == "local":
            continue
        per_elem = r["bytes_per_step"] / (2 * (world - 1) / world * r["params"])
        work = Workload(
            r["params"],
            compute_s=local["step_ms"] / 1000,
            bucket_mb=25.0,
            first_bucket_mb=1.0,
            codec_s_per_element=res["codec_s_per_element"].get(hook.partition("@")[0], 0.0),
        )
        predicted = estimate(work, world, net, hook.partition("@")[0], bytes_per_element=per_elem)
        rows.append(
            {
                "procs": world,
                "hook": hook,
                "MB/step": r["bytes_per_step"] / 1e6,
                "x fewer bytes": r["ratio_vs_fp32"],
                "step ms": r["step_ms"],
                "comm ms measured": r["step_ms"] - local["step_ms"],
                "comm ms predicted": 1000 * predicted.exposed_s,
                "no-overlap ms": 1000 * predicted.comm_s,
                "train loss": r["final_train_loss"],
                "loss vs none %": 100 * (r["final_train_loss"] - none["final_train_loss"]) / none["final_train_loss"],
                "last-epoch vs none %": 100 * (r["train_loss_last_epoch"] / none["train_loss_last_epoch"] - 1),
                "val loss": r["val_loss"],
                "val acc": r["val_accuracy"],
            }
        )
    fitted = {"procs": world, "alpha_us": net.alpha_s * 1e6, "bandwidth_GB_s": net.bandwidth_Bps / 1e9}
    return rows, fitted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,4", help="process counts, comma-separated")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--data", type=Path, help="pneumoniamnist_dev.npz (default: the shared dev file)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per world size")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.data is None:
        from core.config import data_dir

        args.data = (data_dir() or Path("../shared/data")) / "medical" / "pneumoniamnist_dev.npz"
    if not args.data.is_file():
        sys.exit(f"{args.data}: not found (pass --data or set KEEL_DATA_DIR)")
    if args.worker:
        worker(args.out, args.data, args.epochs)
        return
    rows, fitted, raw = [], [], []
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as tmp:
        for world in (int(w) for w in args.worlds.split(",")):
            res = launch(world, data_path=args.data, epochs=args.epochs, tmp=Path(tmp), timeout_s=args.timeout)
            r, f = summarise(res)
            rows += r
            fitted.append(f)
            raw.append(res)
    os.environ.setdefault("COLUMNS", "190")  # rich would squeeze the columns into 80
    print_table(f"DDP gradient compression on CPU (gloo), PneumoniaMNIST MLP, {args.epochs} epochs", rows)
    print_table("alpha-beta fitted to all_reduce timings in the same process group", fitted)
    int8 = [r for r in rows if r["hook"] == "int8"]
    target = {
        "int8_min_bytes_ratio": min(r["x fewer bytes"] for r in int8),
        "int8_max_loss_diff_pct": max(abs(r["loss vs none %"]) for r in int8),
        # The same uncompressed run with another data order: how much this task's final loss moves by itself.
        "none_other_order_max_diff_pct": max(abs(r["loss vs none %"]) for r in rows if r["hook"] == "none@order1"),
    }
    target["met"] = target["int8_min_bytes_ratio"] >= 3.5 and target["int8_max_loss_diff_pct"] <= 1.0
    print(json.dumps(target))
    write_json(
        "compression",
        {
            "command": "keel bench compression " + " ".join(sys.argv[1:]),
            "target": target,
            "rows": rows,
            "fitted_network": fitted,
            "raw": raw,
        },
    )


if __name__ == "__main__":
    main()
