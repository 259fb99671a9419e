"""Tiny models and services for the serving tests: a 4 -> 1 ``torch.nn.Linear`` behind the real registry."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field

from core.registry import ModelRegistry, ModelVersion
from core.serving import ModelDep, ModelHandle, ServingSettings, create_service

N_FEATURES = 4
API_KEY = "test-admin-key"


class LinearPredictor:
    """Scores feature vectors with a Linear layer; remembers its version and the batch sizes it saw.

    Args:
        version: the registry entry it was built from.
        state: the Linear layer's state dict.
        gate: if given, every batch waits for this event first (lets a test hold a batch "in flight").
    """

    def __init__(self, version: ModelVersion, state: dict[str, Any], *, gate: threading.Event | None = None) -> None:
        self.version = version.version
        self.layer = torch.nn.Linear(N_FEATURES, 1)
        self.layer.load_state_dict(state)
        self.gate = gate
        self.entered = threading.Event()  # set once a batch is inside predict_batch
        self.batch_sizes: list[int] = []

    def predict_batch(self, items: list[list[float]]) -> list[dict[str, Any]]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        self.batch_sizes.append(len(items))
        with torch.inference_mode():
            scores = self.layer(torch.tensor(items, dtype=torch.float32)).squeeze(-1)  # (B,)
        return [{"score": float(s), "version": self.version} for s in scores]


def linear_state(seed: int) -> dict[str, torch.Tensor]:
    """Weights of a fresh Linear layer; different seeds give different scores."""
    torch.manual_seed(seed)
    return torch.nn.Linear(N_FEATURES, 1).state_dict()


def register_linear(
    registry: ModelRegistry, name: str = "toy", *, seed: int = 0, aliases: tuple[str, ...] = ("production",)
) -> ModelVersion:
    """Registers a Linear layer as the next version of ``name``."""
    return registry.register(
        name, linear_state(seed), architecture="linear", config={"in": N_FEATURES, "seed": seed}, aliases=aliases
    )


def load_linear(version: ModelVersion, state: dict[str, Any]) -> LinearPredictor:
    """The ``load`` function a service hands to :class:`ModelHandle`."""
    return LinearPredictor(version, state)


class ScoreRequest(BaseModel):
    features: list[float] = Field(min_length=N_FEATURES, max_length=N_FEATURES)


class ScoreResponse(BaseModel):
    score: float
    version: int


def score_router() -> APIRouter:
    """``POST /score``: the one app route of the fake service."""
    router = APIRouter()

    @router.post("/score")
    async def score(req: ScoreRequest, model: ModelDep) -> ScoreResponse:
        return ScoreResponse(**await model.predict(req.features))

    return router


def make_settings(root: Path, **overrides: Any) -> ServingSettings:
    """Test settings: admin key set, fast reload polling off unless asked, the registry under ``root``."""
    values: dict[str, Any] = {"api_key": API_KEY, "reload_interval_s": 0, "registry_root": root}
    values.update(overrides)
    return ServingSettings(**values)


def make_service(
    registry: ModelRegistry,
    *,
    name: str = "toy",
    settings: ServingSettings,
    routers: tuple[APIRouter, ...] = (),
) -> tuple[FastAPI, ModelHandle]:
    """A fake service following ``<name>@production``, with ``POST /score`` plus ``routers``."""
    handle = ModelHandle.from_settings(settings, ref=f"{name}@production", load=load_linear, registry=registry)
    app = create_service(
        name=name, handle=handle, routers=[score_router(), *routers], settings=settings, summary=f"{name} scorer"
    )
    return app, handle
