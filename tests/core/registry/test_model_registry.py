"""ModelRegistry against a real SQLite file and artifact folder in tmp_path."""

from __future__ import annotations

import io
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from core.registry import (
    ModelNotFoundError,
    ModelRegistry,
    TamperedArtifactError,
    fingerprint_arrays,
    fingerprint_file,
)


class Boom:  # an arbitrary object: a weights_only load must refuse it
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


@pytest.fixture
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "reg")


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {"w": torch.randn(3, 2), "nested": {"b": torch.zeros(2), "steps": 7, "tag": "x", "items": [1.5, None]}}


def _register(reg: ModelRegistry, name: str = "fraud", **kwargs) -> object:
    kwargs.setdefault("architecture", "mlp")
    kwargs.setdefault("config", {"hidden": 8})
    return reg.register(name, kwargs.pop("state", _state()), **kwargs)


def test_versions_count_up_per_name_and_round_trip(reg: ModelRegistry) -> None:
    v1 = _register(reg, metrics={"auc": 0.9}, hparams={"lr": 1e-3}, data_fingerprint="sha256:abc")
    v2 = _register(reg, state=_state(1))
    other = _register(reg, "recsys")
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.ref == "fraud@1" and v1.metrics == {"auc": 0.9} and v1.hparams == {"lr": 1e-3}
    assert v1.config == {"hidden": 8} and v1.data_fingerprint == "sha256:abc" and len(v1.sha256) == 64
    assert v1.created_at.endswith("+00:00") and v1.artifact_path.is_file()
    assert reg.get("fraud").version == 2 and reg.get("fraud@latest").version == 2
    mv, state = reg.load("fraud@1")
    assert mv == reg.get("fraud@1")
    assert torch.equal(state["w"], _state()["w"]) and state["nested"]["steps"] == 7
    assert state["nested"]["items"] == [1.5, None]
    assert [m.ref for m in reg.list()] == ["fraud@1", "fraud@2", "recsys@1"]
    assert [m.ref for m in reg.list("recsys")] == ["recsys@1"] and reg.list("nope") == []


def test_unknown_refs_raise_clear_errors(reg: ModelRegistry) -> None:
    _register(reg)
    with pytest.raises(ModelNotFoundError, match="no model named 'ghost'.*known models: fraud"):
        reg.get("ghost")
    with pytest.raises(ModelNotFoundError, match="versions: 1"):
        reg.get("fraud@9")
    with pytest.raises(ModelNotFoundError, match="aliases: none"):
        reg.get("fraud@production")
    with pytest.raises(ModelNotFoundError):
        reg.promote("fraud", "production", 5)


def test_aliases_and_their_history(reg: ModelRegistry) -> None:
    _register(reg, aliases=["staging"])
    _register(reg)
    _register(reg)
    reg.promote("fraud", "production", 1, reason="first")
    reg.promote("fraud", "production", 3, reason="better auc")
    assert reg.get("fraud@production").version == 3
    assert reg.get("fraud@staging").aliases == ("staging",)
    assert reg.get("fraud@3").aliases == ("production",) and reg.get("fraud@1").aliases == ("staging",)
    history = reg.alias_history("fraud", "production")
    assert [(e.from_version, e.to_version, e.reason) for e in history] == [(None, 1, "first"), (1, 3, "better auc")]
    assert history[0].at <= history[1].at
    assert [e.alias for e in reg.alias_history("fraud")] == ["staging", "production", "production"]


@pytest.mark.parametrize("alias", ["latest", "3", "bad alias", ""])
def test_bad_alias_is_refused(reg: ModelRegistry, alias: str) -> None:
    _register(reg)
    with pytest.raises(ValueError, match="invalid alias"):
        reg.promote("fraud", alias, 1)


@pytest.mark.parametrize("name", ["a@b", "", "has space", "-dash"])
def test_bad_name_is_refused(reg: ModelRegistry, name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        _register(reg, name)


def test_lineage_requires_an_existing_parent(reg: ModelRegistry) -> None:
    base = _register(reg)
    child = _register(reg, "fraud-pruned", parent="fraud")
    assert child.parent == base.ref
    with pytest.raises(ModelNotFoundError):
        _register(reg, "fraud-int8", parent="fraud@7")
    assert reg.list("fraud-int8") == []
    with sqlite3.connect(reg.db_path) as conn:  # the schema itself enforces lineage, not just the Python code
        conn.execute("PRAGMA foreign_keys=ON")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO versions VALUES ('x', 1, 'a', '{}', '{}', '{}', NULL, 'ghost', 1, 'h', 'p', 't')")


def test_flipped_byte_is_refused(reg: ModelRegistry) -> None:
    mv = _register(reg)
    data = bytearray(mv.artifact_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    mv.artifact_path.write_bytes(bytes(data))
    with pytest.raises(TamperedArtifactError, match="fraud@1"):
        reg.load("fraud@1")
    mv.artifact_path.unlink()
    with pytest.raises(TamperedArtifactError, match="missing"):
        reg.load("fraud")


def test_pickled_arbitrary_object_is_refused(reg: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="weights_only"):
        reg.register("evil", {"x": Boom()}, architecture="mlp", config={})
    assert not list((reg.root / "artifacts" / "evil").glob("*"))
    # An attacker who rewrites both artifact and hash still meets weights_only=True at load.
    mv = _register(reg)
    buf = io.BytesIO()
    torch.save({"x": Boom()}, buf)
    mv.artifact_path.write_bytes(buf.getvalue())
    import hashlib

    with sqlite3.connect(reg.db_path) as conn:
        conn.execute("UPDATE versions SET sha256 = ?", (hashlib.sha256(buf.getvalue()).hexdigest(),))
    with pytest.raises(Exception, match="(?i)weights.only"):
        reg.load("fraud@1")


def test_metadata_must_be_json(reg: ModelRegistry) -> None:
    with pytest.raises(ValueError, match="config must be JSON-serialisable"):
        _register(reg, config={"fn": object()})
    with pytest.raises(ValueError, match="state must be a mapping"):
        reg.register("fraud", [torch.zeros(1)], architecture="mlp", config={})  # type: ignore[arg-type]


def test_concurrent_registration_gets_distinct_versions(reg: ModelRegistry) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(3):
                ModelRegistry(reg.root).register("fraud", {"w": torch.zeros(2)}, architecture="mlp", config={})
                reg.list("fraud")  # readers run while others write
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [m.version for m in reg.list("fraud")] == list(range(1, 13))
    with sqlite3.connect(reg.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_fingerprints(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text("a,b\n1,2\n")
    assert fingerprint_file(f) == "sha256:" + __import__("hashlib").sha256(b"a,b\n1,2\n").hexdigest()
    x = np.arange(6, dtype=np.float32)
    assert fingerprint_arrays(x) == fingerprint_arrays(torch.arange(6, dtype=torch.float32))
    assert fingerprint_arrays(x) != fingerprint_arrays(x.reshape(2, 3))
    assert fingerprint_arrays(x) != fingerprint_arrays(x.astype(np.float64))
    assert fingerprint_arrays(torch.ones(2, dtype=torch.bfloat16)).startswith("sha256:")
    assert fingerprint_arrays(x, x) != fingerprint_arrays(x)
    with pytest.raises(ValueError, match="at least one"):
        fingerprint_arrays()


def test_state_dict_of_a_module_round_trips(reg: ModelRegistry) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    reg.register("net", OrderedDict(net.state_dict()), architecture="seq", config={})
    _, state = reg.load("net")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True))
