"""The model registry: versioned artifacts in a folder, their metadata and alias history in SQLite.

Layout under ``root``: ``registry.db`` (WAL mode, so a serving poller can read while a trainer
registers) and ``artifacts/<name>/v<version>.pt`` (written atomically, hashed with SHA-256, loaded
back only with ``torch.load(weights_only=True)`` after the hash is checked).

Refs: ``"fraud"`` (latest version), ``"fraud@3"`` (version 3), ``"fraud@production"`` (an alias).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from core.config import keel_home
from core.registry.schema import SCHEMA, check_alias, check_name

__all__ = ["ModelRegistry", "ModelVersion", "AliasEvent", "ModelNotFoundError", "TamperedArtifactError"]


class ModelNotFoundError(LookupError):
    """A ref names no registered model, version or alias."""


class TamperedArtifactError(RuntimeError):
    """An artifact's bytes no longer match the SHA-256 recorded when it was registered."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model (immutable; aliases are a snapshot taken when it was read)."""

    name: str
    version: int
    architecture: str
    config: dict[str, Any]
    hparams: dict[str, Any]
    metrics: dict[str, Any]
    data_fingerprint: str | None
    parent: str | None
    sha256: str
    created_at: str
    artifact_path: Path
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """The exact ref of this version, e.g. ``"fraud@3"``."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (paths as strings), as ``keel registry show`` prints it."""
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "aliases": list(self.aliases),
            "config": self.config,
            "hparams": self.hparams,
            "metrics": self.metrics,
            "data_fingerprint": self.data_fingerprint,
            "parent": self.parent,
            "sha256": self.sha256,
            "created_at": self.created_at,
            "artifact_path": str(self.artifact_path),
        }


@dataclass(frozen=True)
class AliasEvent:
    """``alias`` of ``name`` moved from ``from_version`` (None: it was new) to ``to_version`` at ``at``."""

    name: str
    alias: str
    from_version: int | None
    to_version: int
    at: str
    reason: str = ""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _json(value: Mapping[str, Any] | None, *, what: str) -> str:
    try:
        return json.dumps(dict(value or {}), sort_keys=True, allow_nan=True)
    except TypeError as err:
        raise ValueError(f"{what} must be JSON-serialisable: {err}") from None


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModelRegistry:
    """Versioned model store (SQLite metadata + a local artifact folder).

    Every method opens its own short-lived SQLite connection, so one registry object may be shared
    between threads and many processes may use the same ``root`` at once.

    Args:
        root: folder holding ``registry.db`` and ``artifacts/``; default ``keel_home()/"registry"``.
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else keel_home() / "registry"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "artifacts").mkdir(exist_ok=True)
        self.db_path = self.root / "registry.db"
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves where a write needs it.
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            yield conn
        finally:
            conn.close()

    # ----------------------------------------------------------------------------------- writes
    def register(
        self,
        name: str,
        state: Mapping[str, Any],
        *,
        architecture: str,
        config: dict[str, Any],
        hparams: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        data_fingerprint: str | None = None,
        parent: str | None = None,
        aliases: Sequence[str] = (),
    ) -> ModelVersion:
        """Store ``state`` as the next version of ``name`` (1, 2, 3, ...) and return it.

        Args:
            name: model name (letters, digits, ``_ - .``).
            state: what ``torch.save`` writes and ``torch.load(weights_only=True)`` reads back
                (nested dicts/lists of tensors and plain scalars), usually a ``state_dict``.
            architecture: how to rebuild the module (a model-factory name).
            config: the resolved config that rebuilds the model/run (JSON-serialisable).
            hparams: hyper-parameters; metrics: final metrics; data_fingerprint: see ``fingerprint_*``.
            parent: ref of the version this one derives from (lineage); must exist.
            aliases: aliases to point at the new version right away (recorded in the history).

        Raises:
            ValueError: bad name/alias, non-serialisable metadata, or a state torch cannot save.
            ModelNotFoundError: ``parent`` does not exist.
        """
        check_name(name)
        for alias in aliases:
            check_alias(alias)
        meta = (
            _json(config, what="config"),
            _json(hparams, what="hparams"),
            _json(metrics, what="metrics"),
        )
        parent_mv = self.get(parent) if parent is not None else None
        blob = self._serialise(state)
        digest = _sha256_bytes(blob)
        version = self._insert(
            name,
            blob,
            digest=digest,
            architecture=architecture,
            meta=meta,
            data_fingerprint=data_fingerprint,
            parent_mv=parent_mv,
            aliases=aliases,
        )
        return self.get(f"{name}@{version}")

    @staticmethod
    def _serialise(state: Mapping[str, Any]) -> bytes:
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping (e.g. a state_dict), got {type(state).__name__}")
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        blob = buf.getvalue()
        try:  # refuse now what load() would refuse later
            torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        except Exception as err:
            raise ValueError(f"state holds objects that weights_only loading refuses: {err}") from None
        return blob

    def _insert(
        self,
        name: str,
        blob: bytes,
        *,
        digest: str,
        architecture: str,
        meta: tuple[str, str, str],
        data_fingerprint: str | None,
        parent_mv: ModelVersion | None,
        aliases: Sequence[str],
    ) -> int:
        folder = self.root / "artifacts" / name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = self._write_temp(folder, blob)
        final: Path | None = None
        with self._connect() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")  # serialises version allocation across processes
                row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM versions WHERE name = ?", (name,)).fetchone()
                version = int(row[0]) + 1
                final = folder / f"v{version}.pt"
                os.replace(tmp, final)
                conn.execute(
                    "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        name,
                        version,
                        architecture,
                        *meta,
                        data_fingerprint,
                        parent_mv.name if parent_mv else None,
                        parent_mv.version if parent_mv else None,
                        digest,
                        final.relative_to(self.root).as_posix(),
                        _now(),
                    ),
                )
                for alias in aliases:
                    self._move_alias(conn, name=name, alias=alias, version=version, reason="set at registration")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                for path in (tmp, final):
                    if path is not None and path.exists():
                        path.unlink()
                raise
        return version

    @staticmethod
    def _write_temp(folder: Path, blob: bytes) -> Path:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose a half-written artifact
        return Path(tmp_name)

    def promote(self, name: str, alias: str, version: int, *, reason: str = "") -> AliasEvent:
        """Point ``name@alias`` at ``version`` and record the move in the alias history."""
        check_alias(alias)
        self.get(f"{name}@{int(version)}")  # clear error for an unknown name/version
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                event = self._move_alias(conn, name=name, alias=alias, version=int(version), reason=reason)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return event

    @staticmethod
    def _move_alias(conn: sqlite3.Connection, *, name: str, alias: str, version: int, reason: str) -> AliasEvent:
        row = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        event = AliasEvent(name, alias, int(row[0]) if row else None, version, _now(), reason)
        conn.execute(
            "INSERT INTO aliases (name, alias, version) VALUES (?,?,?) "
            "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version",
            (name, alias, version),
        )
        conn.execute(
            "INSERT INTO alias_events (name, alias, from_version, to_version, at, reason) VALUES (?,?,?,?,?,?)",
            (name, alias, event.from_version, version, event.at, reason),
        )
        return event

    # ------------------------------------------------------------------------------------ reads
    def get(self, ref: str) -> ModelVersion:
        """Resolve ``"name"`` (latest), ``"name@3"`` or ``"name@alias"``; unknown -> ModelNotFoundError."""
        name, _, selector = str(ref).partition("@")
        with self._connect() as conn:
            if selector in ("", "latest"):
                row = conn.execute(
                    "SELECT * FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
                ).fetchone()
            elif selector.isdigit():
                row = conn.execute(
                    "SELECT * FROM versions WHERE name = ? AND version = ?", (name, int(selector))
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT v.* FROM versions v JOIN aliases a ON a.name = v.name AND a.version = v.version "
                    "WHERE a.name = ? AND a.alias = ?",
                    (name, selector),
                ).fetchone()
            if row is None:
                raise ModelNotFoundError(self._not_found_message(conn, name, ref=ref))
            return self._row_to_version(conn, row)

    @staticmethod
    def _not_found_message(conn: sqlite3.Connection, name: str, *, ref: str) -> str:
        versions = [r[0] for r in conn.execute("SELECT version FROM versions WHERE name = ? ORDER BY 1", (name,))]
        if not versions:
            known = [r[0] for r in conn.execute("SELECT DISTINCT name FROM versions ORDER BY 1")]
            return f"no model named {name!r} in the registry (ref {ref!r}); known models: {', '.join(known) or 'none'}"
        aliases = [r[0] for r in conn.execute("SELECT alias FROM aliases WHERE name = ? ORDER BY 1", (name,))]
        return (
            f"model {name!r} has no version or alias matching {ref!r}; "
            f"versions: {', '.join(map(str, versions))}; aliases: {', '.join(aliases) or 'none'}"
        )

    def _row_to_version(self, conn: sqlite3.Connection, row: sqlite3.Row) -> ModelVersion:
        aliases = tuple(
            r[0]
            for r in conn.execute(
                "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias", (row["name"], row["version"])
            )
        )
        parent = f"{row['parent_name']}@{row['parent_version']}" if row["parent_name"] is not None else None
        return ModelVersion(
            name=row["name"],
            version=int(row["version"]),
            architecture=row["architecture"],
            config=json.loads(row["config"]),
            hparams=json.loads(row["hparams"]),
            metrics=json.loads(row["metrics"]),
            data_fingerprint=row["data_fingerprint"],
            parent=parent,
            sha256=row["sha256"],
            created_at=row["created_at"],
            artifact_path=self.root / row["artifact"],
            aliases=aliases,
        )

    def load(self, ref: str, *, map_location: str | torch.device = "cpu") -> tuple[ModelVersion, dict[str, Any]]:
        """Return the version and its state, after checking the artifact's SHA-256.

        Raises:
            ModelNotFoundError: unknown ref.
            TamperedArtifactError: the artifact is missing or its bytes changed since registration.
        """
        mv = self.get(ref)
        try:
            blob = mv.artifact_path.read_bytes()  # hash and load the same bytes: no swap in between
        except FileNotFoundError:
            raise TamperedArtifactError(f"artifact of {mv.ref} is missing: {mv.artifact_path}") from None
        actual = _sha256_bytes(blob)
        if actual != mv.sha256:
            raise TamperedArtifactError(
                f"artifact of {mv.ref} at {mv.artifact_path} has SHA-256 {actual}, registered {mv.sha256}; refusing it"
            )
        state = torch.load(io.BytesIO(blob), weights_only=True, map_location=map_location)
        return mv, state

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """All versions (of ``name`` when given), ordered by name then version."""
        with self._connect() as conn:
            if name is None:
                rows = conn.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
            else:
                rows = conn.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
            return [self._row_to_version(conn, row) for row in rows]

    def alias_history(self, name: str, alias: str | None = None) -> builtins.list[AliasEvent]:
        """Every move of ``name``'s aliases (or of one alias), oldest first."""
        query = "SELECT name, alias, from_version, to_version, at, reason FROM alias_events WHERE name = ?"
        params: tuple[Any, ...] = (name,)
        if alias is not None:
            query += " AND alias = ?"
            params += (alias,)
        with self._connect() as conn:
            rows = conn.execute(query + " ORDER BY id", params).fetchall()
        return [AliasEvent(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]
