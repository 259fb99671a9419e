"""The fraud scoring service: ``POST /v1/score`` -> ``{score, decision, threshold, top_reasons}``.

Built by :func:`core.serving.create_service` (lifespan loading from the registry, micro-batching, health,
metrics, request ids, body limits, admin reload/promote, hot reload when the alias moves). Run it alone with
``keel serve fraud`` or behind the gateway with ``keel serve all``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict

from apps.fraud.model import load_predictor
from core.serving import ModelDep, ModelHandle, ServingSettings, create_service

__all__ = ["FraudSettings", "Transaction", "ScoreResponse", "create_app", "get_settings"]


class FraudSettings(BaseSettings):
    """Fraud-service settings (``KEEL_FRAUD_*``)."""

    model_config = SettingsConfigDict(env_prefix="KEEL_FRAUD_", extra="ignore", frozen=True)

    model_ref: str = Field(default="fraud@production", description="Registry reference of the model served.")


@lru_cache
def get_settings() -> FraudSettings:
    return FraudSettings()


_PCA_FIELDS = {f"V{i}": (float, Field(description=f"PCA component {i} of the card data.")) for i in range(1, 29)}

_TransactionBase = create_model(  # type: ignore[call-overload]
    "_TransactionBase",
    __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
    Time=(float, Field(ge=0, description="Seconds since the first transaction of the data set.")),
    Amount=(float, Field(ge=0, le=1e7, description="Transaction amount.")),
    **_PCA_FIELDS,
)


class Transaction(_TransactionBase):  # type: ignore[misc,valid-type]
    """One card transaction in the ULB format; unknown fields and non-finite numbers are refused (422)."""


class Reason(BaseModel):
    feature: str
    contribution: float


class ScoreResponse(BaseModel):
    score: float = Field(description="Calibrated probability that the transaction is fraud.")
    decision: Literal["fraud", "legit"]
    threshold: float = Field(description="Score above which a transaction is called fraud (target FPR 0.3%).")
    top_reasons: list[Reason]
    model: str = Field(description="Registry version that scored it, e.g. fraud@3.")


router = APIRouter(prefix="/v1", tags=["fraud"])


@router.post("/score", response_model=ScoreResponse)
async def score(txn: Transaction, model: ModelDep) -> ScoreResponse:
    """Score one transaction; concurrent requests are micro-batched into one model call."""
    result = await model.predict(txn.model_dump())
    version = model.model_version
    return ScoreResponse(**result, model=version.ref if version else model.ref)


def create_app(settings: ServingSettings | None = None, fraud: FraudSettings | None = None) -> FastAPI:
    """The fraud FastAPI service; settings come from ``KEEL_*`` / ``KEEL_FRAUD_*`` unless given."""
    settings = settings or ServingSettings()
    fraud = fraud or get_settings()
    handle = ModelHandle.from_settings(settings, ref=fraud.model_ref, load=load_predictor)
    summary = "Card-transaction fraud scoring: calibrated probability, decision at 0.3% FPR, top reasons."
    return create_service(name="fraud", handle=handle, routers=[router], settings=settings, summary=summary)
