"""Small synthetic fraud inputs for tests (real data is used for every reported metric, not here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from apps.fraud.data import ULB_FEATURES

#: A training recipe small enough for unit tests (seconds on 2 cores).
TINY = dict(
    members=2,
    epochs=4,
    hidden=16,
    trees=1,
    tree_iters=20,
    calib_frac=0.3,
    train_frac=0.7,
    batch_size=64,
    progress=False,
)


def synthetic_ulb(path: Path, *, n: int = 700, seed: int = 0) -> Path:
    """ULB-format rows where frauds shift V14/V17 and spend more, as in the real data (real PCA inputs aside)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, len(ULB_FEATURES))), columns=list(ULB_FEATURES))
    frame["Time"] = np.sort(rng.uniform(0, 150_000, n)).round()
    label = (rng.random(n) < 0.1).astype(int)
    frame.loc[label == 1, "V14"] -= 3.0
    frame.loc[label == 1, "V17"] -= 2.0
    frame["Amount"] = np.exp(rng.normal(3, 1, n) + label).round(2)
    frame["Class"] = label
    frame.to_csv(path, index=False)
    return path
