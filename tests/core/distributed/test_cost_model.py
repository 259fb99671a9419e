"""The alpha-beta cost model: formulas, overlap with backward, and fitting alpha/beta back from timings."""

from __future__ import annotations

import pytest

from core.distributed.cost_model import (
    BYTES_PER_ELEMENT,
    Network,
    Workload,
    allreduce_time,
    efficiency_table,
    estimate,
    fit_alpha_beta,
)

NET = Network.gbit(25, alpha_us=10)
RESNET50 = Workload(params=25_557_032, compute_s=0.054)


def test_ring_allreduce_formula() -> None:
    net = Network(alpha_s=1e-5, bandwidth_Bps=1e9)
    assert allreduce_time(4e8, 8, net) == pytest.approx(14 * 1e-5 + 2 * 7 / 8 * 0.4)
    assert allreduce_time(4e8, 1, net) == 0.0


def test_buckets_cover_the_model_in_backward_order() -> None:
    buckets = RESNET50.buckets()
    assert sum(buckets) == RESNET50.params
    assert buckets[0] == 2**20 // 4 and buckets[1] == 25 * 2**20 // 4  # DDP's 1 MiB first bucket, then 25 MiB


def test_fewer_bytes_and_more_bandwidth_raise_efficiency() -> None:
    by_compression = {c: estimate(RESNET50, 32, NET, c).efficiency for c in ("none", "fp16", "int8")}
    assert by_compression["none"] < by_compression["fp16"] < by_compression["int8"] <= 1.0
    slow, fast = (estimate(RESNET50, 32, Network.gbit(g), "none").efficiency for g in (10, 100))
    assert slow < fast
    many = [estimate(RESNET50, p, NET, "none").efficiency for p in (8, 16, 32, 64, 128)]
    assert many == sorted(many, reverse=True)  # latency terms grow with the ring


def test_only_the_last_bucket_is_exposed_when_the_link_keeps_up() -> None:
    slow_compute = Workload(params=RESNET50.params, compute_s=10.0)
    e = estimate(slow_compute, 8, NET, "none")
    last = allreduce_time(4 * slow_compute.buckets()[-1], 8, NET)
    assert e.exposed_s == pytest.approx(last) and e.comm_s > 4 * e.exposed_s  # 5 buckets, 4 hidden
    assert e.efficiency > 0.99


def test_codec_cost_counts_against_compression() -> None:
    slow_codec = Workload(params=RESNET50.params, compute_s=0.054, codec_s_per_element=2e-8)
    assert (
        estimate(slow_codec, 8, Network.gbit(400), "int8").efficiency
        < estimate(RESNET50, 8, Network.gbit(400), "int8").efficiency
    )


def test_fit_recovers_alpha_and_bandwidth() -> None:
    truth = Network(alpha_s=50e-6, bandwidth_Bps=2e9)
    points = [(b, allreduce_time(b, 4, truth)) for b in (1e4, 1e5, 1e6, 1e7)]
    fitted = fit_alpha_beta(points, 4)
    assert fitted.alpha_s == pytest.approx(truth.alpha_s) and fitted.bandwidth_Bps == pytest.approx(2e9)
    with pytest.raises(ValueError, match="points"):
        fit_alpha_beta(points[:1], 4)


def test_table_has_one_row_per_bandwidth_and_compression() -> None:
    rows = efficiency_table(RESNET50, nodes=[8, 128], gbits=[10, 100], compressions=list(BYTES_PER_ELEMENT))
    assert len(rows) == 2 * len(BYTES_PER_ELEMENT)
    assert all(0 < float(r["8"]) <= 1 and float(r["128"]) <= float(r["8"]) for r in rows)
