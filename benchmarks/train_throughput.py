"""Training throughput: plain PyTorch (fp32; bf16 autocast; bf16 + compile) against ``Trainer(precision="auto")``.

Two models, each trained in the same process by hand-written PyTorch loops and by Keel's Trainer with
``precision="auto"`` and no speed flag (``progress=False`` only hides the progress bar):

* a GPT-2-small-shaped Transformer (12 layers, 12 heads, 768 wide, vocabulary 50,304, sequence 1,024:
  124M parameters; attention through ``F.scaled_dot_product_attention``, i.e. FlashAttention on CUDA),
  trained on next-token loss; tokens/s and MFU = (6 N + 12 L C T) FLOPs per token / the device's dense
  bf16 peak (nanoGPT's count; N excludes position embeddings).
* torchvision ResNet-50 (batch 256, 224 x 224, 1,000 classes) with cross-entropy; images/s.

Data are fixed random batches already on the device (throughput does not depend on the values, and no
input pipeline is measured). Every variant uses AdamW; the plain loops use PyTorch's defaults (foreach
AdamW, the default TF32 settings) and ``cudnn.benchmark`` for ResNet-50. Each variant runs ``--warmup``
untimed steps (compilation, cuDNN autotuning) and then ``--steps`` timed ones, synchronised at both ends.
Peak memory is ``torch.cuda.max_memory_allocated`` per variant (not measured on CPU).

On a CPU the steps are timed by this process's CPU time on one thread (``--clock cpu``, ``--threads 1``) and
every variant runs three times, interleaved, keeping the best (``--rounds``): on a shared machine, wall time
and even CPU time drift by tens of percent over minutes. There ``precision="auto"`` does not compile (compile
is a CUDA default), so a ``SpeedConfig(compile=True)`` Trainer run is listed as well.

The whole run stops starting new variants when its ``--budget-s`` would be exceeded (skipped variants
are listed as such); results are written after every variant, to ``benchmarks/results`` and to ``$OUT``.

    python3 benchmarks/train_throughput.py                        # CUDA, full sizes (~3.5 min on an H200)
    python3 benchmarks/train_throughput.py --device cpu --small   # CPU, small shapes
    python3 benchmarks/train_throughput.py --device cpu --smoke   # tiny shapes: checks the script end to end
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import RESULTS_DIR, machine, print_table  # noqa: E402

from core.training import SpeedConfig, ThroughputMeter, Trainer  # noqa: E402

log = logging.getLogger("train_throughput")

# Dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 50304  # GPT-2's 50,257 padded to a multiple of 128
    seq: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention + 4x MLP (GPT-2)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.qkv, self.proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd), nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(approximate="tanh"), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 (Radford et al. 2019) shaped language model; returns the mean next-token cross-entropy."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte, self.wpe = nn.Embedding(cfg.vocab, cfg.n_embd), nn.Embedding(cfg.seq, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    def flops_per_token(self) -> float:
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * self.cfg.seq


@dataclass(frozen=True)
class Workload:
    """One model at one size: how to build it, a batch, its loss and what one batch counts as."""

    name: str
    unit: str  # "tokens" or "images"
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    items: Callable[[Any], int]
    conv: bool


def gpt_workload(cfg: GPTConfig, batch_size: int) -> Workload:
    def batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(cfg.vocab, (batch_size, cfg.seq + 1), generator=g)
        return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)

    return Workload(
        name=f"gpt2-small-shaped L{cfg.n_layer} C{cfg.n_embd} T{cfg.seq} B{batch_size}",
        unit="tokens",
        build=lambda: GPT(cfg),
        batch=batch,
        loss_fn=lambda m, b: m(b[0], b[1]),
        items=lambda b: b[0].numel(),
        conv=False,
    )


def resnet_workload(batch_size: int, size: int) -> Workload:
    import torchvision

    def batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, 3, size, size, generator=g)
        return x.to(device), torch.randint(1000, (batch_size,), generator=g).to(device)

    return Workload(
        name=f"resnet50 {size}px B{batch_size}",
        unit="images",
        build=lambda: torchvision.models.resnet50(num_classes=1000),
        batch=batch,
        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        items=lambda b: int(b[0].shape[0]),
        conv=True,
    )


class RepeatBatch(torch.utils.data.IterableDataset):
    """The same on-device batch ``n`` times (what the Trainer iterates)."""

    def __init__(self, batch: Any, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self) -> Any:
        return iter([self.batch] * self.n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_plain(
    wl: Workload,
    device: torch.device,
    *,
    bf16: bool,
    channels_last: bool,
    compile: bool,
    warmup: int,
    steps: int,
    clock: Callable[[], float],
) -> dict[str, Any]:
    """A hand-written loop: AdamW (PyTorch defaults), optional bf16 autocast / channels-last / torch.compile."""
    model = wl.build().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = wl.batch(device)
    torch.backends.cudnn.benchmark = wl.conv

    def step() -> None:
        inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = wl.loss_fn(model, (inp, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = clock()
    for _ in range(warmup):
        step()
    sync(device)
    t0 = clock()
    for _ in range(steps):
        step()
    sync(device)
    t1 = clock()
    torch.backends.cudnn.benchmark = False
    return {
        "items_per_s": wl.items((x, y)) * steps / (t1 - t0),
        "step_ms": 1e3 * (t1 - t0) / steps,
        "warmup_s": t0 - start,
        "flops_per_item": _flops(model),
    }


class CudaSyncCount(pl.Callback):
    """Counts the implicit host-device syncs CUDA reports (``torch.cuda.set_sync_debug_mode``) after the warm-up.

    Explicit ``torch.cuda.synchronize`` (the meter's, at the window edges) is not reported; ``.item()``,
    blocking copies and data-dependent shapes are. The last timed step also logs (Lightning's final logging step).
    """

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps, self.seen, self.steps, self.syncs = warmup_steps, 0, 0, 0
        self._record: contextlib.AbstractContextManager | None = None
        self._caught: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._record is None and self.seen >= self.warmup_steps:
            self._record = warnings.catch_warnings(record=True)
            self._caught = self._record.__enter__()  # type: ignore[assignment]
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen += 1
        self.steps += int(self._record is not None)

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._record is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._record.__exit__(None, None, None)
            self._record = None
            self.syncs = sum("synchronizing CUDA operation" in str(w.message) for w in self._caught)


def run_keel(
    wl: Workload,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    clock: Callable[[], float],
    speed: SpeedConfig | None = None,
    loss_scaling: str | None = "dynamic",
) -> dict[str, Any]:
    """Keel's Trainer with ``precision="auto"`` and no speed flag (unless ``speed``), timed by ThroughputMeter."""
    model = wl.build()
    meter = ThroughputMeter(warmup_steps=warmup, window_steps=None, items_fn=wl.items, clock=clock)
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    syncs = CudaSyncCount(warmup) if accelerator == "cuda" else None  # CPU: tests/core/training/test_syncs.py
    trainer = Trainer(
        model,
        loss_fn=wl.loss_fn,
        precision="auto",
        accelerator=accelerator,
        max_steps=warmup + steps,
        progress=False,
        callbacks=[meter] if syncs is None else [meter, syncs],
        speed=speed,
        loss_scaling=loss_scaling,
    )
    start = time.perf_counter()
    trainer.train(RepeatBatch(wl.batch(device), warmup + steps))
    window = meter.windows[-1]
    return {
        "items_per_s": window.items_per_s,
        "step_ms": 1e3 * window.step_s,
        "fit_s": time.perf_counter() - start,
        "flops_per_item": _flops(model),
        "precision": trainer.precision.name,
        "precision_reason": trainer.precision.reason,
        "speed": trainer.speed.as_dict(),
        "host_syncs": None if syncs is None else {"timed_steps": syncs.steps, "syncs": syncs.syncs},
    }


def _flops(model: nn.Module) -> float | None:
    return model.flops_per_token() if isinstance(model, GPT) else None


@dataclass(frozen=True)
class Variant:
    label: str
    keel: bool = False
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    no_loss_scaling: bool = False  # Keel with loss_scaling=None: bf16 without the inf/NaN guard's per-step sync


def variants_for(wl: Workload, *, compile: bool, cuda: bool, no_scaler: bool = False) -> list[Variant]:
    out = [Variant("torch fp32"), Variant("torch bf16 autocast", bf16=True)]
    if wl.conv:
        out.append(Variant("torch bf16 + channels-last", bf16=True, channels_last=True))
    out.append(Variant('keel Trainer(precision="auto")', keel=True))
    if compile:
        label = "torch bf16 + channels-last + compile" if wl.conv else "torch bf16 + compile"
        out.append(Variant(label, bf16=True, channels_last=wl.conv, compile=True))
        if not cuda:  # auto compiles on CUDA only; on a CPU, show the Trainer with compile switched on
            out.append(Variant('keel "auto" + SpeedConfig(compile=True)', keel=True, compile=True))
    if no_scaler:
        out.append(Variant('keel "auto" + loss_scaling=None', keel=True, no_loss_scaling=True))
    return out


def plan(
    workloads: list[Workload], *, compile: bool, cuda: bool, no_scaler: bool = False
) -> list[tuple[Workload, Variant]]:
    """Run order by priority, so a tight budget drops the least needed: fp32 baselines and Keel (the
    targets), then plain bf16 + compile (the strongest manual setting), then the eager bf16 settings."""

    def rank(v: Variant) -> int:
        if (v.keel and not v.compile and not v.no_loss_scaling) or v.label == "torch fp32":
            return 0
        return 1 if v.compile or v.keel else 2 if v.channels_last else 3

    pairs = [(wl, v) for wl in workloads for v in variants_for(wl, compile=compile, cuda=cuda, no_scaler=no_scaler)]
    return sorted(pairs, key=lambda p: rank(p[1]))  # stable: model order kept within a rank


def measure(
    wl: Workload,
    v: Variant,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    peak: float | None,
    clock: Callable[[], float],
) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if v.keel:
        speed = SpeedConfig(compile=True) if v.compile else None
        scaling = None if v.no_loss_scaling else "dynamic"
        row = run_keel(wl, device, warmup=warmup, steps=steps, clock=clock, speed=speed, loss_scaling=scaling)
    else:
        row = run_plain(
            wl,
            device,
            bf16=v.bf16,
            channels_last=v.channels_last,
            compile=v.compile,
            warmup=warmup,
            steps=max(2, steps // 2) if v.label == "torch fp32" else steps,  # fp32 steps are slow; the rate is steady
            clock=clock,
        )
    row["wall_s"] = time.perf_counter() - start
    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    fpi = row.pop("flops_per_item")
    row["mfu"] = fpi * row["items_per_s"] / peak if fpi and peak else None
    return row


def cleanup(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table_rows(results: list[dict]) -> list[dict]:
    fp32_mem = {r["model"]: r.get("peak_mem_gib") for r in results if r["variant"] == "torch fp32"}
    rows = []
    for r in results:
        mem, base = r.get("peak_mem_gib"), fp32_mem.get(r["model"])
        rows.append(
            {
                "model": r["model"],
                "variant": r["variant"],
                "throughput": f"{r['items_per_s']:,.0f} {r['unit']}/s"
                if "items_per_s" in r
                else _short(r.get("status")),
                "step ms": f"{r['step_ms']:.1f}" if "step_ms" in r else "",
                "MFU": f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "",
                "peak GiB": f"{mem:.1f}" if mem else "",
                "mem/fp32": f"{mem / base:.2f}" if mem and base else "",
                "wall s": f"{r['wall_s']:.0f}" if "wall_s" in r else "",
                "host syncs": "{syncs} in {timed_steps} steps".format(**r["host_syncs"]) if r.get("host_syncs") else "",
            }
        )
    return rows


def _short(status: str | None) -> str:
    return (status or "").split(":")[0]  # "skipped" / "failed"; the JSON has the whole reason


def write(results: list[dict], meta: dict[str, Any], tag: str) -> None:
    payload = json.dumps({"machine": machine(), **meta, "results": results}, indent=2)
    name = f"train_throughput{tag}.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / name).write_text(payload)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(payload)


def workloads_for(args: argparse.Namespace) -> list[Workload]:
    if args.smoke:
        return [gpt_workload(GPTConfig(vocab=256, seq=32, n_layer=2, n_head=2, n_embd=64), 2), resnet_workload(2, 32)]
    if args.small:
        return [
            gpt_workload(GPTConfig(vocab=8192, seq=256, n_layer=4, n_head=4, n_embd=256), 8),
            resnet_workload(8, 64),
        ]
    full = {"gpt": gpt_workload(GPTConfig(), args.gpt_batch), "resnet": resnet_workload(args.resnet_batch, 224)}
    return [full[m] for m in args.models.split(",")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="small shapes for a CPU")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps: checks the script runs")
    p.add_argument(
        "--budget-s", type=float, default=200.0, help="start no variant that would end past this (imports come on top)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 20 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3, smoke 1)")
    p.add_argument("--gpt-batch", type=int, default=32, help="GPT sequences per batch (full size)")
    p.add_argument("--resnet-batch", type=int, default=256)
    p.add_argument("--no-compile", action="store_true", help="leave out the plain torch.compile variants")
    p.add_argument("--models", default="gpt,resnet", help="full-size models to run: gpt, resnet or gpt,resnet")
    p.add_argument(
        "--keel-no-loss-scaling",
        action="store_true",
        help="also run the Trainer with loss_scaling=None (measures the cost of the default inf/NaN guard)",
    )
    p.add_argument("--eager-estimate-s", type=float, default=15.0, help="budget kept free for an eager variant")
    p.add_argument("--compile-estimate-s", type=float, default=75.0, help="budget kept free for a compiled one")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by device name)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="run every variant this many times, interleaved, and keep the best (default: 1 on CUDA, 3 on CPU, "
        "where other load drifts over minutes)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default=None,
        help="time steps by wall clock or by this process's CPU time (default: wall on CUDA, cpu on CPU, where "
        "other load on a shared machine would distort wall time)",
    )
    args = p.parse_args()
    unknown = set(args.models.split(",")) - {"gpt", "resnet"}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from gpt, resnet (comma-separated)")
    return args


@dataclass
class Session:
    """One benchmark run: the device, the timing protocol and the budget clock."""

    device: torch.device
    peak: float | None
    warmup: int
    steps: int
    budget_s: float
    eager_estimate_s: float
    compile_estimate_s: float
    clock: Callable[[], float]
    start: float = dataclasses.field(default_factory=time.perf_counter)
    compile_s: dict[str, float] = dataclasses.field(default_factory=dict)  # model -> its first compile's wall time

    def estimate(self, wl: Workload, v: Variant) -> tuple[bool, float]:
        """Whether the variant compiles, and the budget to keep free for it."""
        if not (v.compile or (v.keel and self.device.type == "cuda")):
            return False, self.eager_estimate_s
        seen = self.compile_s.get(wl.name)  # a second compile of a model reuses Inductor's on-disk caches
        return True, max(self.eager_estimate_s, 0.5 * seen) if seen else self.compile_estimate_s

    def run(self, wl: Workload, v: Variant) -> dict[str, Any]:
        row: dict[str, Any] = {"model": wl.name, "variant": v.label, "unit": wl.unit}
        compiles, estimate = self.estimate(wl, v)
        left = self.budget_s - (time.perf_counter() - self.start)
        if left < estimate:
            row["status"] = f"skipped: {left:.0f} s of budget left, needs ~{estimate:.0f} s"
            log.warning("%s / %s %s", wl.name, v.label, row["status"])
            return row
        log.info("%s / %s ...", wl.name, v.label)
        try:
            row.update(
                measure(wl, v, self.device, warmup=self.warmup, steps=self.steps, peak=self.peak, clock=self.clock)
            )
        except Exception as exc:  # one failed variant (OOM, a compile error) must not lose the others
            log.exception("%s / %s failed", wl.name, v.label)
            row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        if compiles and "wall_s" in row:
            self.compile_s.setdefault(wl.name, row["wall_s"])
        cleanup(self.device)
        log.info("%s / %s: %s", wl.name, v.label, {k: row[k] for k in row if k not in ("model", "variant")})
        return row


def best_of(rounds: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """Per variant, the round with the highest throughput, with every round's rate alongside."""
    out = []
    for rows in rounds.values():
        measured = [r for r in rows if "items_per_s" in r]
        best = dict(max(measured, key=lambda r: r["items_per_s"]) if measured else rows[-1])
        best["rounds_items_per_s"] = [r.get("items_per_s") for r in rows]
        out.append(best)
    return out


def setup_logging() -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if os.environ.get("OUT"):
        out_dir = Path(os.environ["OUT"])
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / "train_throughput.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", handlers=handlers)


def main() -> None:
    args = parse_args()
    setup_logging()
    os.environ.setdefault("KEEL_HOME", tempfile.mkdtemp(prefix="keel_bench_"))  # Lightning logs, CPU bf16 cache
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: torch sees no CUDA device")
    args.clock = args.clock or ("wall" if cuda else "cpu")
    if cuda and args.clock == "cpu":
        raise SystemExit("--clock cpu times CPU work only; on CUDA use --clock wall")
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    session = Session(
        device=device,
        peak=peak,
        warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 3),
        steps=args.steps or (2 if args.smoke else 20 if cuda else 5),
        budget_s=args.budget_s,
        eager_estimate_s=args.eager_estimate_s,
        compile_estimate_s=args.compile_estimate_s,
        clock=time.process_time if args.clock == "cpu" else time.perf_counter,
    )
    tag = "_smoke" if args.smoke else "" if cuda else "_cpu"
    meta = {
        "device": name,
        "torch": torch.__version__,
        "peak_bf16_flops": peak,
        "warmup": session.warmup,
        "steps": session.steps,
        "clock": args.clock,
        "cpu_threads": None if cuda else args.threads,
        "rounds": args.rounds or (1 if cuda else 3),
        "budget_s": args.budget_s,
        "command": " ".join(sys.argv),
    }
    log.info(
        "%s, torch %s: %d warm-up + %d timed steps per variant, budget %.0f s",
        name,
        torch.__version__,
        session.warmup,
        session.steps,
        args.budget_s,
    )
    workloads, compile = workloads_for(args), not args.no_compile
    rounds: dict[tuple[str, str], list[dict]] = {}
    no_scaler = args.keel_no_loss_scaling
    for _ in range(args.rounds or (1 if cuda else 3)):
        for wl, v in plan(workloads, compile=compile, cuda=cuda, no_scaler=no_scaler):
            rounds.setdefault((wl.name, v.label), []).append(session.run(wl, v))
            write(best_of(rounds), {**meta, "elapsed_s": time.perf_counter() - session.start}, tag)
    order = [
        (wl.name, v.label)
        for wl in workloads
        for v in variants_for(wl, compile=compile, cuda=cuda, no_scaler=no_scaler)
    ]
    results = sorted(best_of(rounds), key=lambda r: order.index((r["model"], r["variant"])))
    write(results, {**meta, "elapsed_s": time.perf_counter() - session.start}, tag)
    os.environ.setdefault("COLUMNS", "160")  # rich's table width when stdout is not a terminal
    print_table(f"Training throughput on {name} (torch {torch.__version__})", table_rows(results))
    log.info("done in %.0f s", time.perf_counter() - session.start)


if __name__ == "__main__":
    main()
