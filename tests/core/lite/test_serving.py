"""A lite model behind core/serving: the batcher's plan hook, ModelHandle + token-budget planner, a real service."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from core.compression.export import ExportReport, register_export
from core.lite import SequencePredictor, TokenBudgetPlanner, sequence_loader
from core.registry import ModelRegistry
from core.serving import MicroBatcher, ModelDep, ModelHandle, create_service
from tests.core.lite.models import MAX_LEN, PAD, VOCAB, TinyEncoder
from tests.utils.serving_fakes import make_settings

Exported = tuple[TinyEncoder, ExportReport]


def reference(model: TinyEncoder, seq: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([seq]))[0].numpy()


def test_batcher_runs_the_groups_its_plan_makes_and_answers_each_request() -> None:
    words = ["aaaaa", "b", "cc", "dddddddd", "e", "ff", "ggg"]
    batches: list[list[str]] = []

    def fn(items: list[str]) -> list[str]:
        batches.append(list(items))
        return [w.upper() for w in items]

    async def main() -> list[str]:
        plan = TokenBudgetPlanner(max_tokens=6)
        batcher: MicroBatcher[str, str] = MicroBatcher(fn, max_batch_size=len(words), max_delay_ms=2000, plan=plan)
        try:
            return await asyncio.gather(*(batcher.submit(w) for w in words))
        finally:
            await batcher.close()

    assert asyncio.run(main()) == [w.upper() for w in words]  # every caller gets its own result, in order
    # one collected batch, planned into similar lengths; the group of the oldest request first
    assert batches == [["aaaaa"], ["b", "e", "cc"], ["dddddddd"], ["ff", "ggg"]]
    assert all(len(b) * max(map(len, b)) <= 6 or len(b) == 1 for b in batches)


def test_a_plan_that_loses_a_request_fails_the_batch_instead_of_hanging() -> None:
    async def main() -> list[Any]:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            lambda items: items, max_batch_size=2, max_delay_ms=2000, plan=lambda items: [[0]]
        )
        try:
            return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        finally:
            await batcher.close()

    results = asyncio.run(main())
    assert all(isinstance(r, ValueError) and "exactly once" in str(r) for r in results)
    with pytest.raises(ValueError, match="bucket_key or plan, not both"):
        MicroBatcher(lambda items: items, bucket_key=len, plan=lambda items: [list(range(len(items)))])


@pytest.fixture
def registry(tmp_path: Path, onnx_encoder: Exported) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "registry")
    model, report = onnx_encoder
    parent = registry.register("enc", model.state_dict(), architecture="tiny_encoder", config={})
    register_export(registry, report, name="enc-onnx", parent=parent.ref, aliases=["production"])
    return registry


def test_model_handle_serves_concurrent_sequences_in_token_budgeted_batches(
    registry: ModelRegistry, onnx_encoder: Exported
) -> None:
    predictors: list[SequencePredictor] = []
    load = sequence_loader(threads=1, pad_value=PAD, pad_multiple=8)

    def tracked(version: Any, state: Any) -> SequencePredictor:
        predictors.append(load(version, state))
        return predictors[-1]

    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, VOCAB, size=int(n)).tolist() for n in rng.integers(1, MAX_LEN, size=24)]

    async def main() -> list[Any]:
        handle = ModelHandle(
            registry, "enc-onnx@production", load=tracked, max_batch_size=len(seqs), max_delay_ms=2000,
            plan=TokenBudgetPlanner(max_tokens=256, pad_multiple=8), reload_interval_s=0,
        )  # fmt: skip
        await handle.start()
        try:
            return await handle.predict_many(seqs)
        finally:
            await handle.stop()

    results = asyncio.run(main())
    for seq, got in zip(seqs, results, strict=True):
        np.testing.assert_allclose(got, reference(onnx_encoder[0], seq), atol=1e-4)
    stats = predictors[0].stats
    assert stats.calls > 1 and stats.real_tokens == sum(map(len, seqs))
    assert stats.padded_tokens <= 256 * stats.calls


class ClassifyRequest(BaseModel):
    tokens: list[int] = Field(min_length=1, max_length=MAX_LEN, description="Token ids, no padding.")


def classify_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/classify")
    async def classify(req: ClassifyRequest, model: ModelDep) -> dict[str, list[float]]:
        return {"logits": (await model.predict(req.tokens)).tolist()}

    return router


def test_a_service_serves_a_registered_lite_model(
    tmp_path: Path, registry: ModelRegistry, onnx_encoder: Exported
) -> None:
    settings = make_settings(registry.root)
    handle = ModelHandle.from_settings(
        settings,
        ref="enc-onnx@production",
        load=sequence_loader(threads=1, pad_value=PAD, pad_multiple=8),
        registry=registry,
        plan=TokenBudgetPlanner(max_tokens=512, pad_multiple=8),
    )
    app = create_service(name="enc", handle=handle, routers=[classify_router()], settings=settings)
    with TestClient(app) as client:
        assert client.get("/readyz").json()["serving"] == "enc-onnx@1"
        for seq in ([5, 9, 2], list(range(1, 40))):
            r = client.post("/v1/classify", json={"tokens": seq})
            assert r.status_code == 200
            np.testing.assert_allclose(r.json()["logits"], reference(onnx_encoder[0], seq), atol=1e-4)
        r = client.post("/v1/classify", json={"tokens": []})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "tokens"]
