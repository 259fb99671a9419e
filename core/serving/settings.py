"""Runtime settings shared by every Keel service (environment variables with the ``KEEL_`` prefix)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServingSettings"]


class ServingSettings(BaseSettings):
    """Serving knobs; every field reads ``KEEL_<FIELD>`` from the environment (e.g. ``KEEL_API_KEY``).

    Attributes:
        api_key: key required in the ``X-API-Key`` header by admin routes; unset or empty disables those routes.
        max_body_bytes: largest accepted request body; larger ones get HTTP 413.
        max_batch_size: most requests per model call (``1`` turns micro-batching off).
        max_delay_ms: longest a request waits for others to share its batch. The default 0 adds no wait: a batch
            takes whatever queued while the previous batch ran, so batches grow with load by themselves
            (``keel bench serve_fraud``: the same peak rate as 2 ms, a third of the latency at low load).

        reload_interval_s: how often the registry alias is checked for a new version (``0`` turns polling off).
        registry_root: model registry folder; ``None`` means the registry's default location.
        torch_threads: torch intra-op threads used for inference; ``None`` keeps torch's default (on a 2-core box
            ``1`` usually gives the best batched throughput).
    """

    model_config = SettingsConfigDict(env_prefix="KEEL_", extra="ignore", frozen=True)

    api_key: SecretStr | None = None
    max_body_bytes: int = Field(default=1_000_000, gt=0)
    max_batch_size: int = Field(default=64, ge=1)
    max_delay_ms: float = Field(default=0.0, ge=0)
    reload_interval_s: float = Field(default=2.0, ge=0)
    registry_root: Path | None = None
    torch_threads: int | None = Field(default=None, ge=1)

    @property
    def admin_enabled(self) -> bool:
        """Whether an API key is configured (admin routes answer 503 otherwise)."""
        return bool(self.api_key and self.api_key.get_secret_value())
