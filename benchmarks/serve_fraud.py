"""Fraud scoring under load: the highest request rate at which ``POST /v1/score`` keeps P99 <= 50 ms.

A real uvicorn server (``keel serve fraud``) on loopback and ``wrk`` (Debian package) as the load generator, one
thread, with a growing number of connections; with micro-batching (max delay 0 and 2 ms) and without (max batch 1).

    keel bench serve_fraud                 # trains a fraud model into a temporary KEEL_HOME first
    keel bench serve_fraud --keel-home .keel --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, start_server, stop_server, write_json  # noqa: E402

from core.utils.net import free_port  # noqa: E402

P99_BOUND_MS = 50.0
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
# (name, max batch size, max delay ms). Delay 0: a batch takes whatever queued while the previous one ran.
MODES = (("batched (delay 0)", 64, 0.0), ("batched (delay 2 ms)", 64, 2.0), ("unbatched", 1, 0.0))


def lua_script(bodies: list[str]) -> str:
    items = ",\n".join(f"  [[{b}]]" for b in bodies)
    return (
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{\n{items}\n}}\nlocal i = 0\n"
        "request = function()\n  i = i % #bodies + 1\n  return wrk.format(nil, nil, nil, bodies[i])\nend\n"
    )


def sample_bodies(data_csv: Path | None, n: int = 256) -> list[str]:
    from apps.fraud.data import load_ulb
    from core.config import data_dir

    data_csv = data_csv or (data_dir() or Path("../shared/data")) / "fraud" / "creditcard_ulb_sample_dev.csv"
    df = load_ulb(data_csv).drop(columns=["Class"], errors="ignore").sample(n, random_state=0)
    return [json.dumps({k: float(v) for k, v in row.items()}) for row in df.to_dict("records")]


def run_wrk(url: str, script: Path, *, connections: int, duration_s: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: float(v) * UNITS_MS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "connections": connections,
        "rps": rps,
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def sweep(
    mode: str, max_batch: int, delay_ms: float, *, home: Path, script: Path, duration_s: int, conns: list[int]
) -> list[dict]:
    port = free_port()
    env = {
        "KEEL_MAX_DELAY_MS": str(delay_ms),
        "KEEL_HOME": str(home),
        "KEEL_MAX_BATCH_SIZE": str(max_batch),
        "OMP_NUM_THREADS": "1",
        "KEEL_TORCH_THREADS": "1",
    }
    proc = start_server(
        [sys.executable, "-m", "core.cli", "serve", "fraud", "--port", str(port)],
        env=env,
        ready_url=f"http://127.0.0.1:{port}/readyz",
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/score"
        run_wrk(url, script, connections=4, duration_s=2)  # warm-up
        return [{"mode": mode, **run_wrk(url, script, connections=c, duration_s=duration_s)} for c in conns]
    finally:
        stop_server(proc)


def best_rate(rows: list[dict]) -> float:
    ok = [r["rps"] for r in rows if r["p99_ms"] <= P99_BOUND_MS and r["non_2xx"] == 0]
    return max(ok, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keel-home", type=Path, help="a KEEL_HOME holding fraud@production (default: train one)")
    ap.add_argument("--data", type=Path, help="ULB-format CSV for request bodies (default: the dev file)")
    ap.add_argument("--duration", type=int, default=8, help="seconds per load level")
    ap.add_argument("--connections", default="1,2,4,8,16,32,64,128")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    home = args.keel_home or tmp / "home"
    if args.keel_home is None:
        subprocess.run(
            [sys.executable, "-m", "core.cli", "train", "fraud"], env={**os.environ, "KEEL_HOME": str(home)}, check=True
        )
    script = tmp / "score.lua"
    script.write_text(lua_script(sample_bodies(args.data)))
    conns = [int(c) for c in args.connections.split(",")]
    rows = []
    for mode, max_batch, delay_ms in MODES:
        rows += sweep(mode, max_batch, delay_ms, home=home, script=script, duration_s=args.duration, conns=conns)
    print_table("POST /v1/score through uvicorn + wrk (1 thread)", rows)
    best = {mode: best_rate([r for r in rows if r["mode"] == mode]) for mode, _, _ in MODES}
    top = max(best["batched (delay 0)"], best["batched (delay 2 ms)"])
    ratio = top / best["unbatched"] if best["unbatched"] else float("inf")
    summary = {"p99_bound_ms": P99_BOUND_MS, **{f"best_rps {m}": v for m, v in best.items()}, "batching_speedup": ratio}
    print_table(f"Highest rate with P99 <= {P99_BOUND_MS:g} ms", [summary])
    write_json("serve_fraud", {"summary": summary, "rows": rows})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
