"""Keel's Trainer (SPEC 2.1): Lightning underneath; precision, loss scaling, exact resume and registration on top."""

from core.training.precision import PRECISIONS, DeviceInfo, Precision, detect_device, resolve_precision
from core.training.speed import SpeedConfig, SpeedPlan, ThroughputMeter, resolve_speed
from core.training.trainer import TrainConfig, Trainer, TrainResult

__all__ = [
    "PRECISIONS",
    "DeviceInfo",
    "Precision",
    "SpeedConfig",
    "SpeedPlan",
    "ThroughputMeter",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "detect_device",
    "resolve_precision",
    "resolve_speed",
]
