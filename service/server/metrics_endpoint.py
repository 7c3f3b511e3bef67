"""GET /metrics in the Prometheus text format. Collected in a worker thread: the drift collector reads a shared
drift store (OODSERVE_DRIFT_STORE) over the network, which must not hold up the event loop."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from oodserve.server.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(service_metrics: MetricsDep) -> Response:
    return Response(await run_in_threadpool(generate_latest, service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
