"""A served model: loaded from the registry, micro-batched, and hot-reloaded when its alias moves.

The app supplies ``load(version, state) -> Predictor``; the handle does the rest. A reload builds the new predictor
off the event loop and swaps it in with one assignment, so requests never see a half-loaded model and a batch
already running finishes on the model it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from core.registry import ModelNotFoundError, ModelRegistry, ModelVersion
from core.serving.batching import BatchStats, MicroBatcher
from core.serving.settings import ServingSettings

__all__ = ["LoadFn", "ModelHandle", "ModelNotReadyError", "Predictor"]

log = logging.getLogger(__name__)


@runtime_checkable
class Predictor(Protocol):
    """What ``load`` must return: a batch-in, batch-out callable model wrapper."""

    def predict_batch(self, items: list[Any]) -> list[Any]:
        """Returns one result per item, in order."""
        ...


LoadFn = Callable[[ModelVersion, dict[str, Any]], Predictor]


class ModelNotReadyError(RuntimeError):
    """Raised by :meth:`ModelHandle.predict` before a model is loaded; services answer HTTP 503."""


@dataclass(frozen=True)
class _Serving:
    version: ModelVersion
    predictor: Predictor


class ModelHandle:
    """The model behind one service.

    Args:
        registry: where versions live.
        ref: what to serve, ``name@alias`` (follows the alias) or ``name@version`` (pinned).
        load: builds a :class:`Predictor` from a registry entry and its verified state; runs in a worker thread.
        max_batch_size: most requests per ``predict_batch`` call (``1``: no batching).
        max_delay_ms: longest a request waits for its batch to fill.
        bucket_key: optional length-bucketing key, see :class:`~core.serving.batching.MicroBatcher`.
        plan: optional batch planner (e.g. :class:`core.lite.TokenBudgetPlanner` for variable-length sequences under
            a token budget), see :class:`~core.serving.batching.MicroBatcher`; not together with ``bucket_key``.
        reload_interval_s: how often the registry is polled for a moved alias; ``0`` turns polling off.
        torch_threads: torch intra-op threads for inference (process-wide), set from the batch worker thread;
            ``None`` keeps torch's default. On small CPU boxes ``1`` usually serves best: the event loop needs a
            core too, and a batch spread over busy cores waits on the slowest.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        ref: str,
        *,
        load: LoadFn,
        max_batch_size: int = 64,
        max_delay_ms: float = 0.0,
        bucket_key: Callable[[Any], Hashable] | None = None,
        reload_interval_s: float = 2.0,
        torch_threads: int | None = None,
        plan: Callable[[list[Any]], Sequence[Sequence[int]]] | None = None,
    ) -> None:
        if "@" not in ref or not all(ref.partition("@")[::2]):
            raise ValueError(f"model ref must look like 'name@alias' or 'name@version', got {ref!r}")
        if reload_interval_s < 0:
            raise ValueError(f"reload_interval_s must be >= 0, got {reload_interval_s}")
        if torch_threads is not None and torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
        self.registry = registry
        self.ref = ref
        self.load_fn = load
        self.reload_interval_s = reload_interval_s
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self.bucket_key = bucket_key
        self.plan = plan
        self.torch_threads = torch_threads
        self.last_error: str | None = None
        self._serving: _Serving | None = None
        self._batcher: MicroBatcher[Any, Any] | None = None
        self._stats = BatchStats()
        self._poller: asyncio.Task[None] | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._new_batcher()  # fail fast on bad batching settings, not at start-up (it starts no thread yet)

    @classmethod
    def from_settings(
        cls,
        settings: ServingSettings,
        *,
        ref: str,
        load: LoadFn,
        registry: ModelRegistry | None = None,
        bucket_key: Callable[[Any], Hashable] | None = None,
        plan: Callable[[list[Any]], Sequence[Sequence[int]]] | None = None,
    ) -> ModelHandle:
        """A handle configured from ``KEEL_*`` settings (batching, reload interval, registry folder)."""
        if registry is None:
            registry = ModelRegistry(settings.registry_root)
        return cls(
            registry,
            ref,
            load=load,
            max_batch_size=settings.max_batch_size,
            max_delay_ms=settings.max_delay_ms,
            bucket_key=bucket_key,
            reload_interval_s=settings.reload_interval_s,
            torch_threads=settings.torch_threads,
            plan=plan,
        )

    @property
    def name(self) -> str:
        """The model name (``fraud`` for ``fraud@production``)."""
        return self.ref.partition("@")[0]

    @property
    def alias(self) -> str:
        """The alias or version part of the ref (``production`` for ``fraud@production``)."""
        return self.ref.partition("@")[2]

    @property
    def ready(self) -> bool:
        """Whether requests can be served (a model is loaded and the handle is started)."""
        return self._serving is not None and self._batcher is not None

    @property
    def model_version(self) -> ModelVersion | None:
        """The registry entry now serving, if any."""
        serving = self._serving
        return None if serving is None else serving.version

    @property
    def version(self) -> int | None:
        """The registry version number now serving, if any."""
        serving = self._serving
        return None if serving is None else serving.version.version

    @property
    def batch_stats(self) -> BatchStats:
        """Histogram of batch sizes since the handle was created (kept across restarts and reloads)."""
        return self._stats

    async def start(self) -> None:
        """Loads the model (a missing or broken one leaves the handle not ready) and starts the reload poller."""
        if self._batcher is None:
            self._batcher = self._new_batcher()
        self._reload_lock = asyncio.Lock()
        log.info(
            "%s: batches of up to %d, max delay %.1f ms, torch threads %s, reload poll every %.1f s",
            self.ref,
            self.max_batch_size,
            self.max_delay_ms,
            self.torch_threads or "default",
            self.reload_interval_s,
        )
        try:
            await self.reload()
        except Exception as exc:
            self._note_failure(exc)
        if self.reload_interval_s > 0 and self._poller is None:
            self._poller = asyncio.create_task(self._poll_forever(), name=f"keel-reload-{self.name}")

    def _new_batcher(self) -> MicroBatcher[Any, Any]:
        threads = self.torch_threads
        batcher: MicroBatcher[Any, Any] = MicroBatcher(
            self._predict_batch,
            max_batch_size=self.max_batch_size,
            max_delay_ms=self.max_delay_ms,
            bucket_key=self.bucket_key,
            plan=self.plan,
            worker_init=None if threads is None else functools.partial(torch.set_num_threads, threads),
        )
        batcher.stats = self._stats  # one histogram for the handle's life, across restarts
        return batcher

    async def stop(self) -> None:
        """Stops the poller and the batcher; queued requests fail, the loaded model is kept for a restart."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._batcher is not None:
            await self._batcher.close()
            self._batcher = None

    async def reload(self) -> bool:
        """Loads the version ``ref`` points to now, if it differs from the one serving.

        Returns:
            ``True`` when a new version was swapped in, ``False`` when it was already serving.

        Raises:
            ModelNotFoundError: the ref names nothing in the registry.
        """
        lock = self._reload_lock or asyncio.Lock()
        async with lock:
            latest = await asyncio.to_thread(self.registry.get, self.ref)
            current = self._serving
            if current is not None and latest.version == current.version.version:
                return False
            # Load by exact version so an alias moving again mid-load cannot mix two versions.
            version, state = await asyncio.to_thread(self.registry.load, latest.ref)
            predictor = await asyncio.to_thread(self.load_fn, version, state)
            if not isinstance(predictor, Predictor):
                raise TypeError(f"load() must return an object with predict_batch(items), got {type(predictor)!r}")
            self._serving = _Serving(version, predictor)  # the atomic swap
            self.last_error = None
            old = "none" if current is None else current.version.ref
            log.info("serving %s (was %s) for %s", version.ref, old, self.ref)
            return True

    async def predict(self, item: Any) -> Any:
        """Scores one item through the micro-batcher.

        Raises:
            ModelNotReadyError: no model is loaded yet, or the handle is not started.
        """
        batcher = self._batcher
        if self._serving is None or batcher is None:
            raise ModelNotReadyError(self._not_ready_reason())
        return await batcher.submit(item)

    async def predict_many(self, items: Sequence[Any]) -> list[Any]:
        """Scores several items; they join the same batches as concurrent single requests."""
        return list(await asyncio.gather(*(self.predict(item) for item in items)))

    def _predict_batch(self, items: list[Any]) -> list[Any]:
        serving = self._serving  # read once: a whole batch runs on one model even if a reload lands meanwhile
        if serving is None:
            raise ModelNotReadyError(self._not_ready_reason())
        return serving.predictor.predict_batch(items)

    def _not_ready_reason(self) -> str:
        if self._batcher is None:
            return f"model {self.ref} is not being served: the service has not started"
        reason = f": {self.last_error}" if self.last_error else ""
        return f"model {self.ref} is not loaded yet{reason}"

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                await self.reload()
            except Exception as exc:  # keep serving the current model; the next poll tries again
                self._note_failure(exc)

    def _note_failure(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if message != self.last_error:  # log once per distinct failure, not at every poll
            if isinstance(exc, ModelNotFoundError):
                log.warning("model %s not in the registry yet (%s); readiness stays 503 until it is", self.ref, exc)
            else:
                log.error("loading model %s failed: %s", self.ref, message, exc_info=exc)
        self.last_error = message
