"""The registry's SQLite schema and the rules for names and aliases."""

from __future__ import annotations

import re

__all__ = ["SCHEMA", "check_alias", "check_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")
_RESERVED_ALIASES = frozenset({"latest"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    architecture TEXT NOT NULL,
    config TEXT NOT NULL,
    hparams TEXT NOT NULL,
    metrics TEXT NOT NULL,
    data_fingerprint TEXT,
    parent_name TEXT,
    parent_version INTEGER,
    sha256 TEXT NOT NULL,
    artifact TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version),
    FOREIGN KEY (parent_name, parent_version) REFERENCES versions (name, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES versions (name, version)
);
CREATE TABLE IF NOT EXISTS alias_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    from_version INTEGER,
    to_version INTEGER NOT NULL,
    at TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    FOREIGN KEY (name, to_version) REFERENCES versions (name, version)
);
CREATE INDEX IF NOT EXISTS alias_events_by_name ON alias_events (name, alias, id);
"""


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (no '@'), up to 128 chars")


def check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias) or alias in _RESERVED_ALIASES:
        raise ValueError(
            f"invalid alias {alias!r}: start with a letter, then letters, digits, '_' or '-'; 'latest' is reserved"
        )
