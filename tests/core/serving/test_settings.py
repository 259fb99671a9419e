"""ServingSettings: read from KEEL_* environment variables, bad values refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.serving import ServingSettings


def test_settings_come_from_keel_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEEL_API_KEY", "s3cret")
    monkeypatch.setenv("KEEL_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("KEEL_REGISTRY_ROOT", str(tmp_path))
    settings = ServingSettings()
    assert settings.admin_enabled and settings.api_key is not None
    assert settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)  # never leaks into logs
    assert (settings.max_batch_size, settings.registry_root) == (8, tmp_path)
    assert (settings.max_body_bytes, settings.max_delay_ms, settings.reload_interval_s) == (1_000_000, 0.0, 2.0)


def test_an_empty_key_disables_admin_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_API_KEY", "")
    assert not ServingSettings().admin_enabled


@pytest.mark.parametrize(
    ("variable", "value"), [("KEEL_MAX_BODY_BYTES", "0"), ("KEEL_MAX_BATCH_SIZE", "many"), ("KEEL_TORCH_THREADS", "0")]
)
def test_bad_values_fail_fast_naming_the_field(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=variable.removeprefix("KEEL_").lower()):
        ServingSettings()
