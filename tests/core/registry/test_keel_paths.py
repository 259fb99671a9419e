"""core.config: where Keel keeps state (the registry's default home) and finds real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import data_dir, keel_home


def test_keel_home_from_env_or_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "h"))
    assert keel_home() == tmp_path / "h" and (tmp_path / "h").is_dir()
    monkeypatch.delenv("KEEL_HOME")
    monkeypatch.chdir(tmp_path)
    assert keel_home() == tmp_path / ".keel" and (tmp_path / ".keel").is_dir()


def test_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_DATA_DIR", str(tmp_path / "d"))
    assert data_dir() == tmp_path / "d"
    monkeypatch.delenv("KEEL_DATA_DIR")
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    assert data_dir() is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert data_dir() == tmp_path / "shared" / "data"
