"""Checkpoints of the fraud recipe's training phases, resumed only for the same recipe on the same data.

The recipe trains its networks twice (on the fit part for calibration, then on everything for the
final model), each through :class:`core.training.Trainer` in its own folder under the root. A
``run.json`` beside each ``last.ckpt`` records the recipe and data fingerprint it belongs to, so
``resume=True`` never continues another recipe's (or another data file's) run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.training import TrainResult

__all__ = ["PhaseCheckpoints", "trainer_record", "RUN_ONLY"]

log = logging.getLogger(__name__)
# Recipe settings that do not change the trained weights: a run may resume with other values of these.
RUN_ONLY = frozenset({"resume", "checkpoint_every_n_steps", "checkpoint_dir", "registry_root", "progress"})


@dataclass(frozen=True)
class PhaseCheckpoints:
    """Where each training phase checkpoints, and what a checkpoint must match to be resumed."""

    root: Path | None
    resume: bool
    stamp: dict[str, Any]  # the recipe (less RUN_ONLY) and the data fingerprint

    @classmethod
    def for_recipe(cls, root: Path, recipe: dict[str, Any], *, resume: bool, data: str) -> PhaseCheckpoints:
        """Checkpoints under ``root`` for ``recipe`` (a flat dict of settings) on the data fingerprinted ``data``."""
        stamp = {k: v for k, v in recipe.items() if k not in RUN_ONLY}
        return cls(root, resume, {**stamp, "data_fingerprint": data})

    def phase(self, name: str) -> tuple[Path | None, bool]:
        """The phase's folder and whether to resume there (only a run of the same recipe on the same data)."""
        if self.root is None:
            return None, False
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        marker, stamp = folder / "run.json", json.dumps(self.stamp, sort_keys=True, default=str)
        resume = self.resume and (folder / "last.ckpt").is_file()  # a phase the killed run never began starts afresh
        if resume and (not marker.is_file() or marker.read_text() != stamp):
            log.warning("%s holds a run of another recipe or data: training from scratch", folder)
            resume = False
        marker.write_text(stamp)
        return folder, resume


def trainer_record(runs: dict[str, TrainResult], root: Path) -> dict[str, Any]:
    """What the Keel Trainer decided and did, for the registry entry."""
    precision = next(iter(runs.values())).precision
    done = {
        phase: {"global_step": r.global_step, "skipped_steps": r.skipped_steps, "loss_scale": r.loss_scale}
        for phase, r in runs.items()
    }
    return {
        "precision": precision.name,
        "precision_reason": precision.reason,
        "checkpoint_dir": str(root),
        "runs": done,
    }
