"""Top-level test configuration: shared fixtures (real Kafka-protocol broker, real redis-server) and markers."""

from __future__ import annotations

import pytest
import torch

pytest_plugins = ["tests.fixtures.kafka", "tests.fixtures.redis"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-only tests carry the ``cuda`` marker and skip cleanly on machines without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (cuda marker)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_keel_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own KEEL_HOME, so no test sees another's registry."""
    monkeypatch.setenv("KEEL_HOME", str(tmp_path_factory.mktemp("keel_home")))
