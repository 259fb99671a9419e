"""Fraud stream throughput: transactions/s through Kafka -> per-card features -> score -> alerts.

A Tansu broker (Kafka protocol) on loopback, simulator transactions pre-produced to ``transactions`` (keyed
by card), then the real stream processor (``apps.fraud.stream.run_stream``, the code behind ``keel stream
fraud``) consumes them all in one consumer group. Throughput counts from the first batch to the last, so the
group join (~5 s with default timeouts) is not in it. The same processor on the in-process bus is run too,
to show what Kafka costs.

    keel bench stream_fraud                       # trains fraud-card into a temporary KEEL_HOME first
    keel bench stream_fraud --keel-home .keel --customers 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from core.utils.openmp import short_spin_waits  # noqa: E402


def produce(bus, topic: str, rows: list[dict]) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    for row in rows:
        bus.publish(topic, row, key=str(row["card_id"]))
    bus.flush(timeout_s=120)
    return len(rows) / (time.perf_counter() - t0)


def run_once(backend: str, rows: list[dict], *, registry, bootstrap: str | None) -> dict:  # noqa: ANN001
    from apps.fraud.stream import run_stream
    from core.streaming import create_bus

    bus = create_bus(backend, **({"bootstrap_servers": bootstrap} if backend == "kafka" else {}))
    topic, alerts = f"transactions-{backend}", f"fraud-alerts-{backend}"
    bus.create_topics([topic, alerts])
    publish_rate = produce(bus, topic, rows)
    stats = run_stream(
        bus=bus,
        topic=topic,
        alerts_topic=alerts,
        group_id=f"bench-{backend}",
        registry=registry,
        max_events=len(rows),
        idle_timeout_s=30,
    )
    bus.close()
    return {
        "bus": backend,
        "transactions": stats["processed"],
        "alerts": stats["alerts"],
        "publish_per_s": round(publish_rate),
        "pipeline_per_s": round(stats["events_per_s"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keel-home", type=Path, help="a KEEL_HOME holding fraud-card@production (default: train one)")
    ap.add_argument("--bootstrap", help="an existing Kafka (default: start Tansu on loopback)")
    ap.add_argument("--customers", type=int, default=1000, help="simulated cards (about 100 tx each)")
    ap.add_argument("--days", type=int, default=60)
    args = ap.parse_args()
    short_spin_waits()  # what `keel stream` does; before torch and numba load (see core.utils.openmp)
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    home = args.keel_home or tmp / "home"
    if args.keel_home is None:
        env = {**os.environ, "KEEL_HOME": str(home)}
        recipe = ["--source", "simulator", "--members", "2", "--epochs", "10", "--progress", "false"]  # demo recipe
        subprocess.run([sys.executable, "-m", "apps.fraud.train", *recipe], env=env, check=True)

    os.environ["KEEL_HOME"] = str(home)

    from apps.fraud.data import SimulatorConfig, simulate_transactions
    from core.registry import ModelRegistry
    from core.streaming.local_broker import LocalKafkaBroker

    frame = simulate_transactions(SimulatorConfig(n_customers=args.customers, n_days=args.days, seed=123))
    rows = frame[["tx_id", "ts", "card_id", "terminal_id", "amount", "label"]].to_dict("records")
    registry = ModelRegistry()
    broker = None if args.bootstrap else LocalKafkaBroker()
    bootstrap = args.bootstrap or broker.start()
    try:
        results = [run_once(b, rows, registry=registry, bootstrap=bootstrap) for b in ("kafka", "memory")]
    finally:
        if broker is not None:
            broker.stop()
    print_table("Fraud stream: transactions -> features -> score -> alerts (one process)", results)
    write_json("stream_fraud", {"rows": results, "customers": args.customers, "days": args.days})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
