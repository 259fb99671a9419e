"""Where Keel keeps its state (registry, checkpoints) and where it finds real data."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["keel_home", "data_dir"]


def keel_home() -> Path:
    """Keel's state folder: ``$KEEL_HOME`` if set, else ``./.keel``; created on demand."""
    home = Path(os.environ.get("KEEL_HOME") or Path.cwd() / ".keel")
    home.mkdir(parents=True, exist_ok=True)
    return home


def data_dir() -> Path | None:
    """The real-data folder: ``$KEEL_DATA_DIR`` if set, else ``../shared/data`` if it exists, else ``None``."""
    env = os.environ.get("KEEL_DATA_DIR")
    if env:
        return Path(env)
    candidate = Path.cwd().parent / "shared" / "data"
    return candidate if candidate.is_dir() else None
