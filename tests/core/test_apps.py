"""The app plug-in contract and the ``keel`` CLI built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.apps import AppSpec, load_apps
from core.cli import build_cli


def test_apps_load_from_entry_points() -> None:
    apps = load_apps()
    assert "fraud" in apps
    spec = apps.get("fraud")
    assert isinstance(spec, AppSpec)
    assert spec.summary and spec.page and spec.stream is not None


def test_unknown_app_names_the_installed_ones() -> None:
    with pytest.raises(KeyError, match="known: .*fraud"):
        load_apps().get("nope")


@pytest.mark.parametrize("group", ["train", "eval"])
def test_every_app_has_train_and_eval_commands(group: str) -> None:
    result = CliRunner().invoke(build_cli(), [group, "--help"])
    assert result.exit_code == 0, result.output
    for name in load_apps():
        assert name in result.output


def test_eval_names_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    result = CliRunner().invoke(build_cli(), ["eval", "fraud", "--data", str(missing)])
    assert result.exit_code != 0
    assert "nope.csv" in result.output


def test_bench_lists_known_benchmarks_for_an_unknown_name() -> None:
    result = CliRunner().invoke(build_cli(), ["bench", "no_such_benchmark"])
    assert result.exit_code != 0
    assert "serve_fraud" in result.output
    helper = CliRunner().invoke(build_cli(), ["bench", "_common"])  # a helper module, not a benchmark
    assert helper.exit_code == 2 and "no benchmark '_common'" in helper.output


def test_apps_command_lists_fraud() -> None:
    result = CliRunner().invoke(build_cli(), ["apps"])
    assert result.exit_code == 0
    assert "fraud" in result.output


def test_eval_without_a_registered_model_is_one_clear_line(tmp_path: Path) -> None:
    data = tmp_path / "rows.csv"
    data.write_text("Time,V1\n1,2\n")
    result = CliRunner().invoke(build_cli(), ["eval", "fraud", "--data", str(data)])
    assert result.exit_code == 1
    assert "no model named 'fraud'" in result.output and "Traceback" not in result.output
