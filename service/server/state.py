"""The one typed state of an oodserve app (`AppState`), stored on the FastAPI app and read through `app_state`."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from oodserve.config import Settings
from oodserve.dataplane import DataPlane
from oodserve.drift.store import DriftStore
from oodserve.engine import EngineRegistry, NotReadyError
from oodserve.observability.metrics import ServiceMetrics
from oodserve.runtime.batching import BatchScheduler
from oodserve.server.reload import BundleReloader

STATE_KEY = "oodserve"

@dataclass
class AppState:
    """Everything a request handler may read: settings, metrics, the served registry (swapped whole by a
    reload), readiness, the batch scheduler, the drift monitor, the reloader and the data plane over them."""

    settings: Settings
    metrics: ServiceMetrics
    batching: BatchScheduler
    registry: EngineRegistry | None = None
    drift: DriftStore | None = None
    """The streams' online tests (in memory or in a shared store); None when OODSERVE_DRIFT=false."""
    ready: bool = False
    grpc_port: int | None = None
    """The port the KServe v2 gRPC server listens on once started (OODSERVE_GRPC_PORT; 0 binds a free one)."""
    reloader: BundleReloader = field(init=False, repr=False)
    plane: DataPlane = field(init=False, repr=False)
    """The transport-neutral data plane over this state: every codec (v1, v2, gRPC, the lean route) goes through it."""

    def __post_init__(self) -> None:
        self.reloader = BundleReloader(self)
        self.plane = DataPlane(self)

    def ready_registry(self) -> EngineRegistry:
        """The served engines; NotReadyError until bundles are loaded and warmed up."""
        registry = self.registry
        if not self.ready or registry is None:
            raise NotReadyError("the service is starting: bundles are not loaded and warmed up yet")
        return registry


def app_state(app_or_connection: Starlette | HTTPConnection) -> AppState:
    """The AppState of an app, or of the app serving a request."""
    app = app_or_connection.app if isinstance(app_or_connection, HTTPConnection) else app_or_connection
    state: AppState = getattr(app.state, STATE_KEY)
    return state
