"""A tiny detector trained for two steps on a synthetic DeepPCB-format set, registered in a temporary registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from apps.pcb_inspection.data import write_synthetic_set
from apps.pcb_inspection.train import PcbTrainConfig, main


@dataclass(frozen=True)
class Trained:
    list_file: Path
    registry_root: Path
    ref: str
    report: dict


@pytest.fixture(scope="package")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("pcb")
    list_file = write_synthetic_set(root / "PCBData", n=6, groups=3, size=64, ext="png")
    cfg = PcbTrainConfig(
        list_file=str(list_file),
        crop=32,
        batch_size=2,
        budget_s=None,
        max_steps=2,
        precision="32",
        progress=False,
        registry_root=str(root / "registry"),
    )
    version, report = main(cfg)
    return Trained(list_file, root / "registry", version.ref, report)


@pytest.fixture
def same_pair_shares(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The ``same_pair`` share of every training data set that ``train.fit`` builds, in order."""
    import apps.pcb_inspection.train as train_module

    shares: list[float] = []

    class Spy(train_module.PcbDataset):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            shares.append(kwargs["same_pair"])

    monkeypatch.setattr(train_module, "PcbDataset", Spy)
    return shares
