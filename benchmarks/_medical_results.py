"""Post-processing of ``benchmarks/results/medical_quality*.json``: merging result files, and a paired bootstrap
of val AUC differences between two of their models (``keel bench medical_quality --merge / --compare``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _common import print_table, write_json


def merge(out: str, parts: list[str]) -> None:
    """Appends the rows and runs of other results files (e.g. ``--profile cpu64`` runs) to ``out``."""
    import json

    from _common import RESULTS_DIR

    payload = json.loads((RESULTS_DIR / f"{out}.json").read_text())
    payload.pop("machine", None)
    for part in parts:
        other = json.loads((RESULTS_DIR / f"{part}.json").read_text())
        payload["rows"] += other["rows"]
        payload["runs"] += [{**run, "profile": other["profile"], "from": part} for run in other["runs"]]
    write_json(out, payload)
    print_table(f"PneumoniaMNIST dev val split ({out})", payload["rows"])


def find_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The trained run named ``key`` (or the one trained run whose name starts with it)."""
    exact = [r for r in runs if r["name"] == key]
    found = exact or [r for r in runs if r["name"].startswith(key) and "ensemble_of" not in r]
    if len(found) != 1:
        names = ", ".join(repr(r["name"]) for r in runs)
        raise SystemExit(f"--assemble: {key!r} matches {len(found)} runs (need one); runs: {names}")
    return found[0]


def compare(out: str, data: Path, work: Path, *, pairs: list[str], n_boot: int = 2000) -> None:
    """Paired bootstrap of the val AUC difference between two of ``out``'s models (``"NAME vs NAME"``): the same
    resampled images (with replacement, 0.025 / 0.975 quantiles) score both, so the interval says whether a
    difference of a few thousandths is more than the luck of 524 images."""
    import json

    import numpy as np
    from _common import RESULTS_DIR
    from sklearn.metrics import roc_auc_score

    from apps.medical.data import load_split
    from apps.medical.model import load_predictor
    from core.registry import ModelRegistry

    payload = json.loads((RESULTS_DIR / f"{out}.json").read_text())
    registry = ModelRegistry(work / "registry")
    val = load_split(data, "val")
    results = {c["pair"]: c for c in payload.get("comparisons", [])}
    for pair in pairs:
        runs = [find_run(payload["runs"], name.strip()) for name in pair.split(" vs ")]
        if len(runs) != 2:
            raise SystemExit(f"--compare: {pair!r} is not 'NAME vs NAME'")
        z = [load_predictor(*registry.load(r["eval"]["model"])).logits(val.images).numpy() for r in runs]
        rng, y = np.random.default_rng(0), val.labels
        diffs = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(y), len(y))
            if y[idx].min() != y[idx].max():
                diffs.append(roc_auc_score(y[idx], z[0][idx]) - roc_auc_score(y[idx], z[1][idx]))
        delta = float(roc_auc_score(y, z[0]) - roc_auc_score(y, z[1]))
        lo, hi = (float(q) for q in np.quantile(diffs, [0.025, 0.975]))
        results[pair] = {
            "pair": pair,
            "auc_diff": delta,
            "ci95": [lo, hi],
            "p_a_better": float(np.mean(np.array(diffs) > 0)),
        }
        print(results[pair], flush=True)
    payload["comparisons"] = list(results.values())
    payload.pop("machine", None)
    write_json(out, payload)
