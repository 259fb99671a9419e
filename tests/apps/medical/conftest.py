"""Fixtures of the medical tests: a synthetic npz in the PneumoniaMNIST format and a tiny registered model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.medical.data import synthetic_xrays
from apps.medical.train import MedicalTrainConfig, main

#: A plain ResNet-18 at 28 px from scratch: the cheapest network the app builds, enough to learn the toy X-rays.
TINY: dict = {
    "backbone": "torchvision:resnet18",
    "pretrained": False,
    "input_size": 28,
    "finetune_epochs": 2,
    "min_steps": 0,
    "min_epoch_steps": 1,
    "batch_size": 32,
    "progress": False,
    "precision": "32",
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: these tiny batches gain nothing from two, and on a busy 2-core machine the second
    thread's waits made every batch-norm call ~40 ms (measured); restored for the other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    train, test = synthetic_xrays(160, seed=1), synthetic_xrays(80, seed=2)
    path = tmp_path_factory.mktemp("medical_data") / "xrays.npz"
    np.savez(
        path,
        train_images=train.images,
        train_labels=train.labels[:, None],
        test_images=test.images,
        test_labels=test.labels,
    )
    return path


@pytest.fixture(scope="session")
def trained_registry(synthetic_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("medical_registry")
    before = torch.get_num_threads()  # session fixtures are set up before the module-scoped thread fixture
    torch.set_num_threads(1)
    try:
        main(MedicalTrainConfig(data_path=str(synthetic_npz), registry_root=str(root), **TINY))
    finally:
        torch.set_num_threads(before)
    return root
