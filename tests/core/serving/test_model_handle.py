"""ModelHandle against a real SQLite registry: loading, readiness, hot reload without failed requests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from core.registry import ModelRegistry, ModelVersion
from core.serving import ModelHandle, ModelNotReadyError
from tests.utils.serving_fakes import LinearPredictor, load_linear, register_linear

FEATURES = [0.5, -1.0, 2.0, 0.25]


def run(coro_fn: Any) -> Any:
    return asyncio.run(coro_fn())


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


async def wait_for(predicate: Any, *, timeout_s: float = 30.0) -> None:
    """Polls ``predicate`` until true; the timeout only stops a broken test from hanging."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_start_loads_the_alias_and_predicts(registry: ModelRegistry) -> None:
    register_linear(registry, seed=1)

    async def main() -> dict[str, Any]:
        handle = ModelHandle(registry, "toy@production", load=load_linear, reload_interval_s=0)
        assert not handle.ready
        await handle.start()
        try:
            assert handle.ready and handle.version == 1
            assert handle.model_version is not None and handle.model_version.ref == "toy@1"
            return await handle.predict(FEATURES)
        finally:
            await handle.stop()

    result = run(main)
    assert result["version"] == 1 and isinstance(result["score"], float)


def test_missing_model_leaves_handle_not_ready_until_registered(registry: ModelRegistry) -> None:
    async def main() -> None:
        handle = ModelHandle(registry, "toy@production", load=load_linear, reload_interval_s=0.02)
        await handle.start()
        try:
            assert not handle.ready
            assert handle.last_error is not None and "toy" in handle.last_error
            with pytest.raises(ModelNotReadyError, match="toy@production is not loaded yet"):
                await handle.predict(FEATURES)
            register_linear(registry, seed=1)
            await wait_for(lambda: handle.ready)  # the poller found it
            assert (await handle.predict(FEATURES))["version"] == 1
        finally:
            await handle.stop()
        assert not handle.ready

    run(main)


def test_hot_reload_switches_version_without_failed_requests(registry: ModelRegistry) -> None:
    register_linear(registry, seed=1)
    v2 = register_linear(registry, seed=2, aliases=())

    async def main() -> list[Any]:
        handle = ModelHandle(registry, "toy@production", load=load_linear, max_delay_ms=1, reload_interval_s=0.02)
        await handle.start()
        results: list[Any] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                results.append(await handle.predict(FEATURES))

        clients = [asyncio.create_task(client()) for _ in range(4)]
        try:
            await wait_for(lambda: len(results) > 20)
            await asyncio.to_thread(registry.promote, "toy", "production", v2.version)
            await wait_for(lambda: handle.version == 2)
            seen = len(results)
            await wait_for(lambda: len(results) > seen + 20)
        finally:
            stop.set()
            await asyncio.gather(*clients)  # re-raises the first failed request, if any
            await handle.stop()
        return results

    versions = [r["version"] for r in run(main)]
    assert set(versions) == {1, 2}
    switch = versions.index(2)
    assert versions[:switch] == [1] * switch
    assert versions[-1] == 2


def test_in_flight_batch_finishes_on_the_old_model(registry: ModelRegistry) -> None:
    register_linear(registry, seed=1)
    gate = threading.Event()
    built: list[LinearPredictor] = []

    def load(version: ModelVersion, state: dict[str, Any]) -> LinearPredictor:
        predictor = LinearPredictor(version, state, gate=gate if version.version == 1 else None)
        built.append(predictor)
        return predictor

    async def main() -> tuple[Any, Any]:
        handle = ModelHandle(registry, "toy@production", load=load, max_batch_size=1, reload_interval_s=0)
        await handle.start()
        try:
            in_flight = asyncio.create_task(handle.predict(FEATURES))  # blocks inside v1's predict_batch
            await wait_for(built[0].entered.is_set)
            register_linear(registry, seed=2)  # moves production to v2
            assert await handle.reload() is True
            assert handle.version == 2
            gate.set()
            return await in_flight, await handle.predict(FEATURES)
        finally:
            gate.set()
            await handle.stop()

    old, new = run(main)
    assert (old["version"], new["version"]) == (1, 2)
    assert len(built) == 2


def test_reload_is_a_no_op_when_the_alias_did_not_move(registry: ModelRegistry) -> None:
    register_linear(registry, seed=1)

    async def main() -> bool:
        handle = ModelHandle(registry, "toy@production", load=load_linear, reload_interval_s=0)
        await handle.start()
        try:
            return await handle.reload()
        finally:
            await handle.stop()

    assert run(main) is False


def test_a_failing_reload_keeps_serving_the_old_model(registry: ModelRegistry) -> None:
    register_linear(registry, seed=1)

    def load(version: ModelVersion, state: dict[str, Any]) -> LinearPredictor:
        if version.version == 2:
            raise RuntimeError("v2 is broken")
        return load_linear(version, state)

    async def main() -> None:
        handle = ModelHandle(registry, "toy@production", load=load, reload_interval_s=0.02)
        await handle.start()
        try:
            register_linear(registry, seed=2)
            await wait_for(lambda: handle.last_error is not None)
            assert "v2 is broken" in (handle.last_error or "")
            assert handle.ready and (await handle.predict(FEATURES))["version"] == 1
        finally:
            await handle.stop()

    run(main)


def test_load_must_return_a_predictor(registry: ModelRegistry) -> None:
    register_linear(registry, seed=1)

    async def main() -> None:
        handle = ModelHandle(registry, "toy@production", load=lambda v, s: object(), reload_interval_s=0)  # type: ignore[arg-type,return-value]
        with pytest.raises(TypeError, match="predict_batch"):
            await handle.reload()

    run(main)


@pytest.mark.parametrize("ref", ["toy", "@production", "toy@"])
def test_bad_ref_is_refused(registry: ModelRegistry, ref: str) -> None:
    with pytest.raises(ValueError, match="name@alias"):
        ModelHandle(registry, ref, load=load_linear)


def test_a_tampered_artifact_is_refused_and_the_handle_stays_not_ready(registry: ModelRegistry) -> None:
    version = register_linear(registry, seed=1)
    version.artifact_path.write_bytes(version.artifact_path.read_bytes() + b"evil")

    async def main() -> None:
        handle = ModelHandle(registry, "toy@production", load=load_linear, reload_interval_s=0)
        await handle.start()
        try:
            assert not handle.ready
            assert "SHA-256" in (handle.last_error or "")
        finally:
            await handle.stop()

    run(main)


def test_torch_threads_applies_to_inference(registry: ModelRegistry) -> None:
    register_linear(registry, seed=1)
    seen: list[int] = []

    def load(version: ModelVersion, state: dict[str, Any]) -> Any:
        predictor = load_linear(version, state)

        class Spy:
            def predict_batch(self, items: list[Any]) -> list[Any]:
                seen.append(torch.get_num_threads())
                return predictor.predict_batch(items)

        return Spy()

    async def main() -> None:
        handle = ModelHandle(registry, "toy@production", load=load, reload_interval_s=0, torch_threads=1)
        await handle.start()
        try:
            await handle.predict(FEATURES)
        finally:
            await handle.stop()

    before = torch.get_num_threads()
    try:
        run(main)
    finally:
        torch.set_num_threads(before)  # the setting is process-wide: leave other tests as they were
    assert seen == [1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"reload_interval_s": -1}, "reload_interval_s"),
        ({"torch_threads": 0}, "torch_threads"),
    ],
)
def test_bad_handle_settings_fail_fast(registry: ModelRegistry, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelHandle(registry, "toy@production", load=load_linear, **kwargs)
