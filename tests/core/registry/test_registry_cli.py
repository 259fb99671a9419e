"""`keel registry` sub-app through typer's CliRunner against a real registry folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from core.registry import ModelRegistry
from core.registry.cli import registry_app

runner = CliRunner()


def _seed(root: Path) -> ModelRegistry:
    reg = ModelRegistry(root)
    for auc in (0.8, 0.9):
        reg.register("fraud", {"w": torch.zeros(2)}, architecture="mlp", config={"h": 4}, metrics={"auc": auc})
    return reg


def test_ls_show_promote(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    reg = _seed(root)
    out = runner.invoke(registry_app, ["ls", "--root", str(root)])
    assert out.exit_code == 0, out.output
    assert "fraud@1" in out.output and "fraud@2" in out.output and "auc=0.9" in out.output

    out = runner.invoke(registry_app, ["promote", "fraud", "1", "--alias", "production", "--root", str(root)])
    assert out.exit_code == 0, out.output
    assert "nothing -> v1" in out.output
    assert reg.get("fraud@production").version == 1

    out = runner.invoke(registry_app, ["show", "fraud@production", "--root", str(root)])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["ref"] == "fraud@1" and shown["aliases"] == ["production"] and shown["metrics"] == {"auc": 0.8}


def test_errors_exit_nonzero_with_a_message(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    _seed(root)
    out = runner.invoke(registry_app, ["show", "ghost", "--root", str(root)])
    assert out.exit_code == 1 and "no model named 'ghost'" in out.output
    out = runner.invoke(registry_app, ["promote", "fraud", "9", "--root", str(root)])
    assert out.exit_code == 1 and "versions: 1, 2" in out.output
    out = runner.invoke(registry_app, ["ls", "nope", "--root", str(root)])
    assert out.exit_code == 0 and "no versions of 'nope'" in out.output


def test_default_root_is_keel_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    out = runner.invoke(registry_app, ["ls"])
    assert out.exit_code == 0 and "registry is empty" in out.output
    assert (tmp_path / "home" / "registry" / "registry.db").is_file()
