"""``short_spin_waits`` sets GOMP_SPINCOUNT only when nobody chose a policy, and says whether it took effect."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core.utils.openmp import SPIN_COUNT, short_spin_waits

_PROBE = (
    "import os; from core.utils.openmp import short_spin_waits; r = short_spin_waits(); "
    "print(r, os.environ['GOMP_SPINCOUNT'])"
)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}


@pytest.fixture
def no_policy(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OpenMP wait setting in this process's environment; whatever the test sets is undone afterwards."""
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "recorded")  # so that the original state (set or not) is restored
        monkeypatch.delenv(name)
    return monkeypatch


def test_a_fresh_process_gets_the_short_spin_before_torch_loads() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], env=_clean_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", str(SPIN_COUNT)]


@pytest.mark.usefixtures("no_policy")
def test_too_late_once_torch_is_loaded_but_children_inherit_it() -> None:
    import torch  # noqa: F401 -- the point: the OpenMP runtime is already loaded

    assert short_spin_waits() is False
    assert os.environ["GOMP_SPINCOUNT"] == str(SPIN_COUNT)


@pytest.mark.parametrize(("name", "value"), [("GOMP_SPINCOUNT", "5"), ("OMP_WAIT_POLICY", "ACTIVE")])
def test_the_users_own_setting_wins(no_policy: pytest.MonkeyPatch, name: str, value: str) -> None:
    no_policy.setenv(name, value)
    assert short_spin_waits() is False
    assert os.environ[name] == value
    if name == "OMP_WAIT_POLICY":
        assert "GOMP_SPINCOUNT" not in os.environ
