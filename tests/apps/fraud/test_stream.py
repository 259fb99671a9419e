"""The fraud stream processor: scoring, dead letters, and exactly-once alerts across a crash (memory + Kafka)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from apps.fraud.data import SimulatorConfig, simulate_transactions
from apps.fraud.model import load_predictor
from apps.fraud.stream import FraudStreamProcessor, run_stream
from apps.fraud.train import FraudTrainConfig, main
from core.registry import ModelRegistry
from core.streaming import EventBus, create_bus
from tests.fixtures.kafka import KAFKA_TEST_OPTIONS, unique_name

COLUMNS = ["tx_id", "ts", "card_id", "terminal_id", "amount", "label"]
BATCH = 80  # the crash comes at the third commit: events [160, 240) were alerted but not committed


@pytest.fixture(scope="module")
def card_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A KEEL_HOME with a tiny per-card model registered as fraud-card@production."""
    home = tmp_path_factory.mktemp("stream_home")
    cfg = FraudTrainConfig(
        source="simulator",
        sim_customers=60,
        sim_terminals=120,
        sim_days=12,
        history=4,
        members=1,
        epochs=3,
        trees=0,
        refit=False,
        target_fpr=0.02,
        progress=False,
        registry_root=str(home / "registry"),
    )
    main(cfg)
    return home


@pytest.fixture(scope="module")
def transactions() -> list[dict]:
    frame = simulate_transactions(SimulatorConfig(n_customers=40, n_terminals=80, n_days=10, seed=7))
    return frame[COLUMNS].to_dict("records")


def _registry(home: Path) -> ModelRegistry:
    return ModelRegistry(home / "registry")


def _reference_alerts(home: Path, rows: list[dict]) -> set[int]:
    """Alerts of one uninterrupted pass, computed without any bus."""
    version, state = _registry(home).load("fraud-card@production")
    proc = FraudStreamProcessor(load_predictor(version, state), create_bus("memory"), "unused", version.ref)
    scores = proc.score(list(rows))
    return {r["tx_id"] for r, p in zip(rows, scores, strict=True) if p >= proc.predictor.threshold}


def _check_alerts_straddle_the_crash(reference: set[int], rows: list[dict]) -> None:
    """The data must alert inside the crashed batch (repeats) and after it (losses), or the test proves little."""
    offsets = {i for i, r in enumerate(rows) if r["tx_id"] in reference}
    assert any(2 * BATCH <= o < 3 * BATCH for o in offsets) and any(o >= 3 * BATCH for o in offsets), sorted(offsets)


def _publish(bus: EventBus, topic: str, rows: list[dict]) -> None:
    for row in rows:
        bus.publish(topic, row, key=str(row["card_id"]))
    bus.flush()


def _alert_ids(bus: EventBus, topic: str) -> list[int]:
    return [e.value["tx_id"] for batch in bus.read(topic) for e in batch]


def test_stream_scores_everything_and_dead_letters_bad_events(card_model: Path, transactions: list[dict]) -> None:
    bus = create_bus("memory")
    _publish(bus, "tx", transactions[:300])
    bus.publish("tx", {"tx_id": "bad", "ts": "yesterday", "card_id": 1, "terminal_id": 2, "amount": 3.0})
    bus.publish("tx", b"not json")
    stats = run_stream(
        bus=bus, topic="tx", alerts_topic="alerts", group_id="g", registry=_registry(card_model), idle_timeout_s=0.5
    )
    assert stats["processed"] == 300 and stats["dead_lettered"] == 2
    reasons = [e.header("keel.dlq.reason") for batch in bus.read("tx.dlq") for e in batch]
    assert any(r and "ts" in r for r in reasons), reasons
    assert sorted(_alert_ids(bus, "alerts")) == sorted(_reference_alerts(card_model, transactions[:300]))


@pytest.mark.parametrize("snapshots", [False, True])
def test_crash_before_commit_neither_loses_nor_repeats_alerts(
    card_model: Path, transactions: list[dict], tmp_path: Path, snapshots: bool
) -> None:
    """A processor dying after it alerted a batch but before committing it (the worst moment), then a restart.

    Without snapshots the restart replays the two committed batches into the feature state; with a snapshot taken
    before every batch (the third one's: at offset 160, all committed) it replays nothing.
    """
    state = {"state_path": tmp_path / "state.npz", "snapshot_every_s": 1e-6} if snapshots else {}
    bus = create_bus("memory")
    _publish(bus, "tx", transactions)
    reference = _reference_alerts(card_model, transactions)
    _check_alerts_straddle_the_crash(reference, transactions)

    class Crash(Exception):
        pass

    calls = Counter()

    def crash_on_third_commit(original):  # noqa: ANN001, ANN202
        def commit(self):  # noqa: ANN001, ANN202
            calls["commit"] += 1
            if calls["commit"] == 3:
                raise Crash
            return original(self)

        return commit

    from core.streaming import memory_backend

    run = dict(bus=bus, topic="tx", alerts_topic="alerts", group_id="g", registry=_registry(card_model), **state)
    original = memory_backend._MemoryConsumer.commit
    memory_backend._MemoryConsumer.commit = crash_on_third_commit(original)  # type: ignore[method-assign]
    try:
        with pytest.raises(Crash):
            run_stream(**run, idle_timeout_s=0.5, max_poll_records=BATCH)
    finally:
        memory_backend._MemoryConsumer.commit = original  # type: ignore[method-assign]
    before = _alert_ids(bus, "alerts")
    stats = run_stream(**run, idle_timeout_s=0.5)
    alerts = _alert_ids(bus, "alerts")
    assert before and stats["replayed"] == (0 if snapshots else 2 * BATCH)
    assert len(alerts) == len(set(alerts)), "an alert was published twice"
    assert set(alerts) == reference
    assert bus.committed("tx", group_id="g") == bus.end_offsets("tx")


def test_a_clean_stop_snapshots_and_a_snapshot_that_does_not_fit_is_ignored(
    card_model: Path, transactions: list[dict], tmp_path: Path
) -> None:
    bus = create_bus("memory")
    _publish(bus, "tx", transactions)
    run = dict(bus=bus, topic="tx", registry=_registry(card_model), idle_timeout_s=0.5)
    snap = tmp_path / "g.npz"
    first = run_stream(
        **run, alerts_topic="alerts", group_id="g", state_path=snap, max_events=2 * BATCH, max_poll_records=BATCH
    )
    assert first["snapshots"] == 1 and snap.exists()  # the clean stop's
    rest = run_stream(**run, alerts_topic="alerts", group_id="g", state_path=snap)
    assert rest["replayed"] == 0 and first["processed"] + rest["processed"] == len(transactions)
    alerts = _alert_ids(bus, "alerts")
    assert len(alerts) == len(set(alerts)) and set(alerts) == _reference_alerts(card_model, transactions)
    # Group h has committed 80 events; g's snapshot (at the topic's end) is for another group: replay h's 80.
    run_stream(**run, group_id="h", alerts_topic="alerts-h", max_events=BATCH, max_poll_records=BATCH)
    again = run_stream(**run, group_id="h", alerts_topic="alerts-h", state_path=snap, max_events=1)
    assert again["replayed"] == BATCH
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    committed = bus.committed("tx", group_id="h")[0]
    damaged = run_stream(**run, group_id="h", alerts_topic="alerts-h", state_path=garbage, max_events=1)
    assert damaged["replayed"] == committed > BATCH  # unreadable: ignored, everything committed is replayed


@pytest.mark.kafka
def test_sigkilled_kafka_processor_resumes_exactly(
    card_model: Path, transactions: list[dict], kafka_bootstrap: str, tmp_path: Path
) -> None:
    """``kill -9`` of a real processor process right before a commit, then ``keel stream fraud`` again.

    The killed processor snapshots its state before every batch, so the restart loads the one taken before the
    third batch (offset 160, committed) and replays nothing.
    """
    topic, alerts_topic, group = unique_name("tx"), unique_name("alerts"), unique_name("scorer")
    state = tmp_path / "state.npz"
    bus = create_bus("kafka", bootstrap_servers=kafka_bootstrap, **KAFKA_TEST_OPTIONS)
    bus.create_topics([topic, alerts_topic])
    _publish(bus, topic, transactions)
    script = textwrap.dedent(f"""
        import os, signal
        from core.streaming import kafka_backend
        original, commits = kafka_backend._KafkaGroupConsumer.commit, [0]
        def commit(self):
            commits[0] += 1
            if commits[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self)
        kafka_backend._KafkaGroupConsumer.commit = commit
        from apps.fraud.stream import run_stream
        run_stream(bus="kafka", bootstrap={kafka_bootstrap!r}, topic={topic!r}, alerts_topic={alerts_topic!r},
                   group_id={group!r}, idle_timeout_s=5, max_poll_records={BATCH}, bus_options={KAFKA_TEST_OPTIONS!r},
                   state_path={str(state)!r}, snapshot_every_s=1e-6)
    """)
    env = {**os.environ, "KEEL_HOME": str(card_model)}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert bus.committed(topic, group_id=group) == {0: 2 * BATCH}
    cli = ["stream", "fraud", "--bus", "kafka", "--bootstrap", kafka_bootstrap, "--topic", topic, "--alerts"]
    cli += [
        alerts_topic,
        "--group",
        group,
        "--batch-size",
        str(BATCH),
        "--max-events",
        str(len(transactions) - 2 * BATCH),
        "--state-file",
        str(state),
    ]
    cli += ["--idle-timeout", "40"]  # the dead member's session must expire before the partition is reassigned
    restarted = subprocess.run([sys.executable, "-m", "core.cli", *cli], env=env, capture_output=True, timeout=120)
    assert restarted.returncode == 0, restarted.stderr.decode()[-2000:]
    assert json.loads(restarted.stdout.decode().splitlines()[-1])["replayed"] == 0
    alerts = _alert_ids(bus, alerts_topic)
    assert len(alerts) == len(set(alerts)), "an alert was published twice"
    reference = _reference_alerts(card_model, transactions)
    _check_alerts_straddle_the_crash(reference, transactions)
    assert set(alerts) == reference
    assert bus.committed(topic, group_id=group) == bus.end_offsets(topic)
    bus.close()
