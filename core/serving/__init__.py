"""Serving (SPEC 2.10): one factory for every app's FastAPI service, micro-batching, hot reload and a gateway."""

from core.serving.batching import BatcherClosedError, BatchStats, MicroBatcher
from core.serving.dependencies import AdminDep, ModelDep, SettingsDep, get_handle, get_service_settings
from core.serving.factory import PromoteRequest, create_service
from core.serving.gateway import build_gateway
from core.serving.model_handle import LoadFn, ModelHandle, ModelNotReadyError, Predictor
from core.serving.settings import ServingSettings

__all__ = [
    "AdminDep",
    "BatchStats",
    "BatcherClosedError",
    "LoadFn",
    "MicroBatcher",
    "ModelDep",
    "ModelHandle",
    "ModelNotReadyError",
    "Predictor",
    "PromoteRequest",
    "ServingSettings",
    "SettingsDep",
    "build_gateway",
    "create_service",
    "get_handle",
    "get_service_settings",
]
