"""X-ray classification under load: ``POST /v1/classify`` latency (P50 / P99) and throughput through uvicorn.

A real uvicorn server (``keel serve medical``) on loopback serves a trained medical model; an asyncio client
(httpx) keeps ``C`` requests in flight, each a multipart upload (field ``file``) of a real PneumoniaMNIST
``val`` image encoded as PNG, cycling through the split. Every level runs for ``--duration`` seconds after a
warm-up; with ``?saliency=png`` (Grad-CAM: a backward pass per image, then a 256x256 PNG overlay) too.

The client runs on the same machine as the server, so on 2 cores it takes CPU from it: the figures are what one
box serving and loading itself achieves, a lower bound on the server alone.

    keel bench serve_medical --registry /path/to/registry --model medical@1   # an already trained model
    keel bench serve_medical                                                  # trains a small one first (~2 min)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, start_server, stop_server, write_json  # noqa: E402

from core.utils.net import free_port  # noqa: E402

#: The small model trained when no registry is given: Lite0 (ImageNet weights) at 32 px, the demo recipe.
SMALL_RECIPE: dict[str, Any] = {
    "input_size": 32,
    "label_fraction": 0.34,
    "warmup_epochs": 1,
    "finetune_epochs": 1,
    "min_steps": 0,
    "progress": False,
}


def png_bodies(data: Path, split: str) -> list[bytes]:
    """Every image of ``split`` as PNG bytes."""
    from PIL import Image

    from apps.medical.data import load_split

    out = []
    for image in load_split(data, split).images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def _load(url: str, bodies: list[bytes], *, concurrency: int, duration_s: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    failures: dict[int, int] = {}
    counter = iter(range(1 << 62))
    deadline = time.perf_counter() + duration_s

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            body = bodies[next(counter) % len(bodies)]
            start = time.perf_counter()
            r = await client.post(url, files={"file": ("xray.png", body, "image/png")})
            if r.status_code != 200:
                failures[r.status_code] = failures.get(r.status_code, 0) + 1
                continue
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "mean_ms": float(ms.mean()) if len(ms) else float("nan"),
        "errors": sum(failures.values()),
        "error_codes": {str(k): v for k, v in failures.items()},
    }


def sweep(
    base_url: str, bodies: list[bytes], *, saliency: bool, levels: list[int], duration_s: float
) -> list[dict[str, Any]]:
    url = f"{base_url}/v1/classify" + ("?saliency=png" if saliency else "")
    asyncio.run(_load(url, bodies, concurrency=2, duration_s=2.0))  # warm-up (first batches, allocator, caches)
    mode = "saliency=png" if saliency else "json"
    return [{"mode": mode, **asyncio.run(_load(url, bodies, concurrency=c, duration_s=duration_s))} for c in levels]


def train_small(data: Path, registry_root: Path, threads: int) -> str:
    from apps.medical.train import MedicalTrainConfig, main

    cfg = MedicalTrainConfig(
        data_path=str(data), registry_root=str(registry_root), torch_threads=threads, **SMALL_RECIPE
    )
    return main(cfg).ref


def _levels(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", type=Path, help="registry folder holding --model (default: train a small model)")
    ap.add_argument("--model", default="medical@production", help="registry ref served")
    ap.add_argument("--data", type=Path, help="npz for the uploads (default: the dev file)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load level")
    ap.add_argument("--concurrency", default="1,4,16", help="requests in flight, per level")
    ap.add_argument("--saliency-concurrency", default="1,4", help="levels for ?saliency=png ('' to skip)")
    ap.add_argument("--server-threads", type=int, default=1, help="KEEL_TORCH_THREADS of the server")
    ap.add_argument("--out", default="serve_medical", help="results name (benchmarks/results/NAME.json)")
    args = ap.parse_args(argv)

    from apps.medical.train import default_data_path
    from core.registry import ModelRegistry

    data = args.data or default_data_path()
    bodies = png_bodies(data, args.split)
    root, ref = args.registry, args.model
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="keel-serve-medical-")) / "registry"
        ref = train_small(data, root, args.server_threads)
    version = ModelRegistry(root).get(ref)
    port = free_port()
    env = {
        "KEEL_REGISTRY_ROOT": str(root),
        "KEEL_MEDICAL_MODEL_REF": version.ref,
        "KEEL_TORCH_THREADS": str(args.server_threads),
        "OMP_NUM_THREADS": str(args.server_threads),
        "KEEL_RELOAD_INTERVAL_S": "0",
    }
    proc = start_server(
        [sys.executable, "-m", "core.cli", "serve", "medical", "--port", str(port)],
        env=env,
        ready_url=f"http://127.0.0.1:{port}/readyz",
        timeout_s=600,  # torch + timm imports and the model load take minutes on a 2-core box other jobs share
    )
    base = f"http://127.0.0.1:{port}"
    try:
        rows = sweep(base, bodies, saliency=False, levels=_levels(args.concurrency), duration_s=args.duration)
        edge = version.config.get("kind") == "medical-edge"  # an exported model: no gradients, no Grad-CAM
        if _levels(args.saliency_concurrency) and not edge:
            levels = _levels(args.saliency_concurrency)
            rows += sweep(base, bodies, saliency=True, levels=levels, duration_s=args.duration)
    finally:
        stop_server(proc)
    model = {
        "ref": version.ref,
        "architecture": version.architecture,
        "input_px": version.config["net"]["input_size"],
        "kind": version.config.get("kind"),
        "variant": version.config.get("variant", "pytorch"),
        "parent": version.parent,
    }
    title = f"POST /v1/classify through uvicorn ({model['architecture']}, {model['input_px']} px, {args.split} PNGs)"
    print_table(title, [{k: v for k, v in r.items() if k != "error_codes"} for r in rows])
    payload = {"model": model, "split": args.split, "duration_s": args.duration, "server_threads": args.server_threads}
    payload["load_average_1_5_15_min"] = list(os.getloadavg())  # other jobs on the machine at the end of the run
    write_json(args.out, {**payload, "rows": rows})


if __name__ == "__main__":
    main()
