"""Short OpenMP spin-waits, so a busy machine does not stall torch's and numba's worker threads.

libgomp (the OpenMP runtime behind torch's intra-op threads and numba's ``omp`` threading layer) lets an idle
worker spin for ~300,000 iterations before it sleeps. When every core is busy, a spinning worker holds the core
that the thread it waits for needs, and small parallel kernels (the fraud stream's batch of GRUs and trees) slow
down by one to two orders of magnitude: the stream fell from 27k to 0.7-1.4k transactions/s with one other busy
process on these 2 cores. A spin count of 1,000 cost nothing measurable on a quiet machine (33.3k against 32.9k
events/s, memory bus) and kept 15-22k/s under that load; ``OMP_WAIT_POLICY=PASSIVE`` (no spin at all) cost 25%
quiet. libgomp reads the setting once, when it is loaded, so it must be set before torch or numba is imported.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["SPIN_COUNT", "short_spin_waits"]

log = logging.getLogger(__name__)

SPIN_COUNT = 1000


def short_spin_waits() -> bool:
    """Sets ``GOMP_SPINCOUNT`` for this process (and its children) unless the user set it or an OpenMP wait policy.

    Returns:
        True when the setting is in force for the libraries still to be loaded; False when the user's own
        setting stands or torch / numba were imported already (then it applies to child processes only).
    """
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    loaded = [m for m in ("torch", "numba") if m in sys.modules]
    if loaded:
        log.debug("GOMP_SPINCOUNT set after %s was imported: it applies to child processes only", loaded)
        return False
    log.debug("GOMP_SPINCOUNT=%d: OpenMP threads sleep after a short spin (core.utils.openmp)", SPIN_COUNT)
    return True
