"""Run a function on several CPU processes (gloo) or a script under torchrun, never hanging a test run."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.utils.net import free_port

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).resolve().parent / "train_worker.py"


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_processes(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 120) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes in one gloo group; results by rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = out.get(timeout=timeout_s)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    except queue.Empty:
        raise AssertionError(f"workers did not finish within {timeout_s} s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def torchrun(settings: list[str], *, nproc: int, out: Path, timeout_s: float = 240) -> dict[str, Any]:
    """Run ``train_worker.py`` under torchrun (or directly for ``nproc=0``) and return its JSON."""
    flags = [a for s in settings for a in ("--setting", s)]
    script = [str(WORKER), "--out", str(out), *flags]
    if nproc:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
        cmd = [sys.executable, *launcher, *script]
    else:
        cmd = [sys.executable, *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # Own session: on a timeout the whole group (torchrun and its workers) is killed, nothing is left behind.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout_s} s") from None
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return json.loads(out.read_text())
