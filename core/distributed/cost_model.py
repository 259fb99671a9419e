"""Communication cost model: alpha-beta collectives, DDP bucket overlap with backward, scaling efficiency.

A collective over ``p`` ranks costs ``steps * alpha + volume / bandwidth``:

* ring all-reduce of ``n`` bytes: ``2 (p-1) alpha + 2 (p-1)/p * n / B`` (Patarasuk & Yuan 2009);
* Keel's int8 exchange (all-to-all, then all-gather of ``n8`` bytes with scales):
  ``2 (p-1) alpha + 2 (p-1)/p * n8 / B``, the same shape with ~4x fewer bytes;
* a codec cost (quantise / cast) of ``codec_s_per_element`` per gradient element and bucket.

Overlap: DDP hands gradients over in buckets (25 MB by default) as backward produces them, last
layers first. Bucket ``i`` is ready once its share of the backward has run; buckets go over one link
in order. Whatever communication is left when backward ends is *exposed* and adds to the step:

    step = compute + exposed,     efficiency = compute / step

(one device per node, so the ring crosses the network at every hop; see ``docs/distributed.md``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "BYTES_PER_ELEMENT",
    "Estimate",
    "Network",
    "Workload",
    "allreduce_time",
    "efficiency_table",
    "estimate",
    "fit_alpha_beta",
]

# Bytes on the wire per gradient element (elementwise hooks; PowerSGD depends on the layer shapes).
BYTES_PER_ELEMENT = {"none": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0 + 4.0 / 256}


@dataclass(frozen=True)
class Network:
    """Per-message latency ``alpha_s`` and per-link bandwidth in bytes/s."""

    alpha_s: float
    bandwidth_Bps: float

    @classmethod
    def gbit(cls, gbit_per_s: float, *, alpha_us: float = 10.0) -> Network:
        return cls(alpha_s=alpha_us * 1e-6, bandwidth_Bps=gbit_per_s * 1e9 / 8)


@dataclass(frozen=True)
class Workload:
    """One training step of a model on one node.

    Attributes:
        params: gradient elements exchanged per step.
        compute_s: forward + backward + optimizer time of one step on one node.
        backward_fraction: share of ``compute_s`` spent in backward (when buckets become ready).
        bucket_mb: DDP bucket size (fp32 MiB); ``first_bucket_mb`` for the first one (DDP: 1 MiB).
        codec_s_per_element: time to compress + decompress one element, per bucket (0: free).
    """

    params: int
    compute_s: float
    backward_fraction: float = 2 / 3
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    codec_s_per_element: float = 0.0

    def buckets(self) -> list[int]:
        """Elements per bucket, in the order backward fills them."""
        first = min(self.params, max(1, int(self.first_bucket_mb * 2**20 / 4)))
        per = max(1, int(self.bucket_mb * 2**20 / 4))
        full, rest = divmod(self.params - first, per)
        return [first] + [per] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class Estimate:
    nodes: int
    compression: str
    compute_s: float
    comm_s: float  # total communication time, overlapped or not
    exposed_s: float  # communication (and codec) time not hidden behind backward

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def efficiency(self) -> float:
        return self.compute_s / self.step_s


def allreduce_time(nbytes: float, nodes: int, net: Network) -> float:
    """Ring all-reduce (or reduce-scatter + all-gather) of ``nbytes`` over ``nodes`` ranks."""
    if nodes <= 1:
        return 0.0
    return 2 * (nodes - 1) * net.alpha_s + 2 * (nodes - 1) / nodes * nbytes / net.bandwidth_Bps


def estimate(
    work: Workload, nodes: int, net: Network, compression: str, *, bytes_per_element: float | None = None
) -> Estimate:
    """Step time and efficiency of ``work`` on ``nodes`` nodes; ``bytes_per_element`` overrides the table."""
    per_elem = bytes_per_element if bytes_per_element is not None else BYTES_PER_ELEMENT[compression]
    backward = work.compute_s * work.backward_fraction
    # Forward, then backward (the optimizer step is folded into compute_s and waits for the last bucket):
    # bucket i is ready after its cumulative share of the backward.
    start_backward = work.compute_s - backward
    backward_end = work.compute_s
    link_free, total, done = start_backward, 0.0, 0
    for size in work.buckets():
        done += size
        ready = start_backward + backward * done / work.params
        cost = allreduce_time(size * per_elem, nodes, net) + (work.codec_s_per_element * size if nodes > 1 else 0.0)
        link_free = max(link_free, ready) + cost
        total += cost
    exposed = max(0.0, link_free - backward_end)
    return Estimate(nodes, compression, work.compute_s, total, exposed)


def efficiency_table(
    work: Workload, *, nodes: Iterable[int], gbits: Iterable[float], compressions: Iterable[str], alpha_us: float = 10.0
) -> list[dict[str, float | int | str]]:
    """One row per (bandwidth, compression): the efficiency on each node count."""
    rows: list[dict[str, float | int | str]] = []
    node_list = list(nodes)
    for g in gbits:
        net = Network.gbit(g, alpha_us=alpha_us)
        for c in compressions:
            row: dict[str, float | int | str] = {"gbit_s": g, "compression": c}
            for p in node_list:
                row[str(p)] = round(estimate(work, p, net, c).efficiency, 3)
            rows.append(row)
    return rows


def fit_alpha_beta(points: Iterable[tuple[float, float]], nodes: int) -> Network:
    """Least-squares ``alpha`` and bandwidth from measured (bytes, seconds) all-reduce points on ``nodes`` ranks."""
    pts = list(points)
    if len(pts) < 2 or nodes < 2:
        raise ValueError(f"need >= 2 (bytes, seconds) points and >= 2 ranks, got {len(pts)} points, {nodes} ranks")
    xs, ys = [b for b, _ in pts], [t for _, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    if slope <= 0 or not math.isfinite(slope):
        raise ValueError(f"all-reduce time does not grow with size (slope {slope}): measurements too noisy")
    alpha = max(0.0, intercept) / (2 * (nodes - 1))
    bandwidth = 2 * (nodes - 1) / nodes / slope
    return Network(alpha_s=alpha, bandwidth_Bps=bandwidth)


# Reference workloads for the docs table: one H200 per node, step times from SPEC 2.1's targets.
REFERENCE_WORKLOADS = {
    # ResNet-50, batch 256 at 4,715 img/s -> 54.3 ms per step.
    "resnet50": Workload(params=25_557_032, compute_s=256 / 4715),
    # GPT-2 small, 16 x 1024 tokens at 45% MFU of 989 TFLOP/s: (6 N + 12 L d T) FLOPs per token -> 31.6 ms.
    "gpt2-small": Workload(
        params=124_439_808, compute_s=16 * 1024 * (6 * 124_439_808 + 12 * 12 * 768 * 1024) / (0.45 * 989e12)
    ),
}


def main(argv: list[str] | None = None) -> None:
    """``python -m core.distributed.cost_model [--params N --compute-ms T]``: the efficiency table as Markdown."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--params", type=float, help="gradient elements (default: the reference workloads)")
    ap.add_argument("--compute-ms", type=float, help="forward + backward + step time on one node")
    ap.add_argument("--gbits", default="10,25,100,400")
    ap.add_argument("--nodes", default="8,16,32,64,128")
    ap.add_argument("--alpha-us", type=float, default=10.0)
    ap.add_argument("--compressions", default="none,fp16,int8", help="bf16 sends what fp16 sends")
    args = ap.parse_args(argv)
    if (args.params is None) != (args.compute_ms is None):
        ap.error("give both --params and --compute-ms, or neither")
    works = {"model": Workload(int(args.params), args.compute_ms / 1000)} if args.params else dict(REFERENCE_WORKLOADS)
    nodes = [int(n) for n in args.nodes.split(",")]
    for name, work in works.items():
        print(f"\n{name}: {work.params / 1e6:.1f}M parameters, {work.compute_s * 1000:.1f} ms compute per step\n")
        print("| Gbit/s | compression | " + " | ".join(f"{n} nodes" for n in nodes) + " |")
        print("|---|---|" + "---|" * len(nodes))
        rows = efficiency_table(
            work,
            nodes=nodes,
            gbits=[float(g) for g in args.gbits.split(",")],
            compressions=args.compressions.split(","),
            alpha_us=args.alpha_us,
        )
        for r in rows:
            print(f"| {r['gbit_s']:g} | {r['compression']} | " + " | ".join(f"{r[str(n)]:.0%}" for n in nodes) + " |")


if __name__ == "__main__":
    main()
