"""Hot reload: load and verify new bundles completely, warm them up, then swap the served registry atomically.

Request handlers read `AppState.registry` once per request (oodserve.server.deps.get_ready_registry) and keep
that object for the whole request, so the swap is a single reference assignment: requests already running
finish on the old engines, later ones see the new. A refused reload leaves the old registry serving.
The checks are the start-up ones (oodserve.engine.load_registry: manifest and schema_version, sha256 of every
file, missing/extra files, ONNX input/output names and shapes, calibration without pickle) plus a warm-up run.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from oodserve.bundle.loader import BundleError
from oodserve.config import Settings
from oodserve.engine import EngineRegistry, NotReadyError, load_registry
from oodserve.observability.metrics import ServiceMetrics
from oodserve.runtime.providers import GpuRequiredError
from oodserve.runtime.sessions import RuntimeOptions

logger = logging.getLogger("oodserve.reload")


class ReloadError(Exception):
    """A reload that did not happen; the old bundles keep serving."""

    @property
    def message(self) -> str:
        return str(self)


class ReloadInProgressError(ReloadError):
    """Another reload is running."""


class ReloadNotReadyError(ReloadError, NotReadyError):
    """The service is still starting."""


class BundleRefusedError(ReloadError):
    """A new bundle failed verification, loading or its warm-up run."""


class ReloadFailedError(ReloadError):
    """The reload failed unexpectedly."""


@dataclass(frozen=True)
class ReloadOutcome:
    """What is served after a successful reload."""

    default: str
    models: dict[str, str]  # name -> version
    bundles: dict[str, str]  # name -> directory
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "reloaded",
            "default": self.default,
            "models": [
                {"name": name, "version": version, "bundle": self.bundles[name]} for name, version in self.models.items()
            ],
            "seconds": self.seconds,
        }


def served_directories(registry: EngineRegistry) -> list[Path]:
    """Bundle directories of a registry, the default model's first."""
    default = registry.default
    return [default.bundle.directory, *(engine.bundle.directory for engine in registry if engine is not default)]


def describe_registry(registry: EngineRegistry) -> str:
    return ", ".join(f"{engine.name} {engine.version}" for engine in registry)


def load_and_warm_up(directories: list[Path], options: RuntimeOptions, warmup_batch_size: int) -> EngineRegistry:
    """Blocking: verify and load every bundle, then run each engine once. Any failure is a BundleError."""
    registry = load_registry(directories, options)
    for engine in registry:
        try:
            engine.warm_up(warmup_batch_size)
        except Exception as error:  # noqa: BLE001 - a bundle whose models fail on a valid batch is refused
            raise BundleError(f"bundle {engine.bundle.directory}: warm-up run failed: {error}") from error
    return registry


class ServedState(Protocol):
    """What a reload reads and swaps (the app's AppState)."""

    settings: Settings
    metrics: ServiceMetrics
    registry: EngineRegistry | None
    ready: bool


class BundleReloader:
    """Reloads the bundles of one app; one reload at a time (a concurrent one gets 409)."""

    def __init__(self, state: ServedState) -> None:
        self.state = state
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self._lock.locked()

    async def reload(self, default_bundle: Path | None = None, trigger: str = "api") -> ReloadOutcome:
        """Reload every served bundle from its directory, with `default_bundle` replacing the default model's.

        Raises ReloadInProgressError while another reload runs, ReloadNotReadyError before start-up finished,
        BundleRefusedError when a bundle is refused (the message names it and why), ReloadFailedError for an
        unexpected failure. The old bundles keep serving.
        """
        if self._lock.locked():
            raise ReloadInProgressError("another reload is running; retry when it has finished")
        async with self._lock:
            current: EngineRegistry | None = self.state.registry
            if current is None or not self.state.ready:
                raise ReloadNotReadyError("the service is still starting; reload after it is ready")
            settings: Settings = self.state.settings
            metrics: ServiceMetrics = self.state.metrics
            directories = served_directories(current)
            if default_bundle is not None:
                directories[0] = default_bundle
            started = time.perf_counter()
            logger.info("reload (%s) of %s started", trigger, [str(directory) for directory in directories])
            try:
                new = await run_in_threadpool(
                    load_and_warm_up, directories, RuntimeOptions.from_settings(settings), settings.warmup_batch_size
                )
            except (BundleError, GpuRequiredError, OSError) as error:
                metrics.record_reload("failure")
                logger.error("reload (%s) refused, still serving %s: %s", trigger, describe_registry(current), error)
                raise BundleRefusedError(
                    f"reload refused, still serving {describe_registry(current)}: {error}"
                ) from error
            except Exception as error:  # noqa: BLE001 - the old bundles must keep serving whatever happened
                metrics.record_reload("failure")
                logger.exception("reload (%s) failed, still serving %s", trigger, describe_registry(current))
                raise ReloadFailedError(
                    f"reload failed, still serving {describe_registry(current)}: {error!r}"
                ) from error
            metrics.record_reload("success", new)  # hooks the new engines' timing, then their model_info series
            self.state.registry = new  # the atomic swap: one reference assignment
            seconds = time.perf_counter() - started
            logger.info(
                "reload (%s) done in %.2f s: now serving %s (was %s)", trigger, seconds, describe_registry(new), describe_registry(current)
            )
            return ReloadOutcome(
                default=new.default_name,
                models={engine.name: engine.version for engine in new},
                bundles={engine.name: str(engine.bundle.directory) for engine in new},
                seconds=seconds,
            )


def install_sighup_reload(reloader: BundleReloader) -> Callable[[], None] | None:
    """On SIGHUP, reload in the background on the running loop. Returns an uninstaller, or None where signals
    cannot be handled (not the main thread, e.g. under TestClient, or no SIGHUP on this platform)."""
    if not hasattr(signal, "SIGHUP"):
        return None
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[ReloadOutcome]] = set()

    def on_sighup() -> None:
        task = loop.create_task(reloader.reload(trigger="SIGHUP"))
        pending.add(task)
        task.add_done_callback(_finish_signal_reload(pending))

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (NotImplementedError, RuntimeError, ValueError) as error:
        logger.debug("SIGHUP reload not installed: %s", error)
        return None
    logger.info("SIGHUP reloads the bundles")

    def uninstall() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return uninstall


def _finish_signal_reload(pending: set[asyncio.Task[ReloadOutcome]]) -> Callable[[asyncio.Task[ReloadOutcome]], None]:
    def done(task: asyncio.Task[ReloadOutcome]) -> None:
        pending.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, ReloadError):
            logger.error("SIGHUP reload not done: %s", error.message)
        elif error is not None:
            logger.error("SIGHUP reload failed: %r", error)

    return done
