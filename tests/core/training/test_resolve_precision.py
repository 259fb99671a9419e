"""resolve_precision on faked devices: the decision and its reason, no hardware needed."""

from __future__ import annotations

import pytest

from core.training import DeviceInfo, resolve_precision
from core.utils.registry import UnknownNameError

CPU = DeviceInfo()
CPU_FAST_BF16 = DeviceInfo(cpu_bf16_faster=True, bf16_supported=True)
H200 = DeviceInfo(type="cuda", name="NVIDIA H200", capability=(9, 0), bf16_supported=True)
A100 = DeviceInfo(type="cuda", name="A100", capability=(8, 0), bf16_supported=True)
V100 = DeviceInfo(type="cuda", name="V100", capability=(7, 0), bf16_supported=False)


@pytest.mark.parametrize(
    ("requested", "device", "expected", "reason_part"),
    [
        ("auto", H200, "bf16-mixed", "sm_90"),
        ("auto", A100, "bf16-mixed", "bf16 natively"),
        ("auto", V100, "16-mixed", "dynamic loss scaling"),
        ("auto", CPU, "32-true", "fp32"),
        ("auto", CPU_FAST_BF16, "bf16-mixed", "measured faster"),
        ("32", H200, "32-true", "explicitly"),
        ("fp32", CPU, "32-true", "explicitly"),
        ("bf16", H200, "bf16-mixed", "explicitly"),
        ("BF16-Mixed", CPU, "bf16-mixed", "explicitly"),
        ("16-mixed", V100, "16-mixed", "explicitly"),
        ("bf16-true", A100, "bf16-true", "explicitly"),
        ("bf16-mixed", V100, "16-mixed", "downgraded"),
        ("bf16-true", V100, "16-mixed", "downgraded"),
        ("16-mixed", CPU, "32-true", "downgraded"),
    ],
)
def test_resolution_table(requested: str, device: DeviceInfo, expected: str, reason_part: str) -> None:
    decision = resolve_precision(requested, device)
    assert decision.name == expected
    assert decision.requested == requested
    assert reason_part in decision.reason


def test_is_pure() -> None:
    assert resolve_precision("auto", V100) == resolve_precision("auto", V100)
    assert resolve_precision("auto", V100).is_fp16 and not resolve_precision("auto", H200).is_fp16


def test_unknown_precision_lists_known_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown precision 'fp8'.*bf16-mixed"):
        resolve_precision("fp8", CPU)
