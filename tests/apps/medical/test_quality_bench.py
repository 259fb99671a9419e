"""The medical quality benchmark's run table and its run lookup (benchmarks/medical_quality.py)."""

from __future__ import annotations

from types import ModuleType

import pytest

from apps.medical.train import MedicalTrainConfig
from tests.utils.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("medical_quality")


def test_every_profile_gives_valid_recipes_and_names_its_variants(bench: ModuleType) -> None:
    for profile in bench.PROFILES:
        for _, _, overrides in bench.runs(profile, [0.1, 1.0], None):
            MedicalTrainConfig(**overrides)  # unknown keys would raise
    names = {name: cfg for name, _, cfg in bench.runs("cpu64e10mix", [1.0], None)}
    assert names["lite0 pretrained, mixup 0.2"]["mixup"] == 0.2
    assert names["resnet18 scratch 28px, up to 10 epochs"]["mixup"] == 0.0  # the plain baseline stays plain
    assert "resnet18 scratch 28px (baseline)" in [name for name, _, _ in bench.runs("cpu", [1.0], None)]


def test_runs_are_found_by_exact_name_or_unique_start(bench: ModuleType) -> None:
    runs = [
        {"name": "lite0 pretrained"},
        {"name": "resnet18 scratch 28px (baseline)"},
        {"name": "resnet18 scratch 28px, up to 10 epochs"},
        {"name": "lite0 pretrained + resnet18 scratch 28px (baseline)", "ensemble_of": ["a", "b"]},
    ]
    assert bench.find_run(runs, "lite0 pretrained") is runs[0]
    assert bench.find_run(runs, "lite0") is runs[0]  # the ensemble row is not a trained run
    with pytest.raises(SystemExit, match="'resnet18' matches 2 runs"):
        bench.find_run(runs, "resnet18")
    with pytest.raises(SystemExit, match="matches 0 runs"):
        bench.find_run(runs, "resnet50")
