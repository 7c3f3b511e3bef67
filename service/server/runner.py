"""Running the app under uvicorn with the service's limits and a graceful, exit-0 shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

from oodserve.config import Settings

logger = logging.getLogger("oodserve.serving")


def uvicorn_config_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments derived from the settings."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "limit_concurrency": settings.max_concurrent_connections,  # beyond it uvicorn answers 503
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds,
        # Longer than the clients' idle expiry: a server closing an idle connection just as a client reuses
        # it resets that request (docs/pages/benchmarks.md has the load run that showed it).
        "timeout_keep_alive": settings.keep_alive_seconds,
    }


def run_server(app: Any, settings: Settings) -> None:
    """Serve `app` until SIGTERM or SIGINT, then shut down gracefully and return (exit status 0).

    On the signal uvicorn stops accepting connections, closes idle keep-alive connections, lets every
    in-flight request finish (for at most settings.shutdown_grace_seconds), runs the lifespan shutdown,
    and then re-raises the signal it caught. The handlers installed here turn that re-raised signal into
    a normal return, so a graceful stop exits 0; a signal arriving before uvicorn has installed its own
    handlers (nothing can be in flight yet) exits 0 at once.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_config_options(settings)))

    def after_graceful_stop(signum: int, frame: FrameType | None) -> None:
        if not server.started:
            raise SystemExit(0)
        logger.info("%s: in-flight requests finished, exiting with status 0", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, after_graceful_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(3)  # uvicorn could not start (e.g. the port is taken or the lifespan failed)
