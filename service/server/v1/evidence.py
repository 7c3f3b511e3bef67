"""The evidence behind verdicts, for people and dashboards: histograms of a model's calibration scores
(where an input's score falls among the in-distribution scores) and its recent OOD rate."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from oodserve.scoring.histograms import MAX_BINS, calibration_histogram
from oodserve.server.deps import MetricsDep, NamedEngineDep
from oodserve.server.responses import OrjsonResponse
from oodserve.server.schemas import ERROR_RESPONSES

router = APIRouter(prefix="/v1", tags=["v1"])


@router.get(
    "/models/{name}/calibration",
    summary="Histograms of the calibration scores of every signal and of the fused statistic",
    responses=ERROR_RESPONSES,
)
async def get_calibration(engine: NamedEngineDep, bins: Annotated[int, Query(ge=1, le=MAX_BINS)] = 40) -> OrjsonResponse:
    calibration = engine.calibration
    return OrjsonResponse({
        "model": engine.name,
        "model_version": engine.version,
        "bins": bins,
        "direction": "larger scores are less like the calibration data; p-value = (1 + #calibration scores >= score) / (n + 1)",
        "signals": {name: calibration_histogram(scores, bins).to_json() for name, scores in calibration.reported_calibration().items()},
        "fused": calibration_histogram(calibration.fused, bins).to_json(),
    })


@router.get("/models/{name}/traffic", summary="The model's recent verdicts: OOD rate over the last scored inputs",
            responses=ERROR_RESPONSES)
async def get_traffic(engine: NamedEngineDep, metrics: MetricsDep) -> OrjsonResponse:
    held, ood = metrics.verdict_window(engine.name).counts()
    return OrjsonResponse({
        "model": engine.name,
        "window": metrics.ood_rate_window,
        "instances": held,
        "ood": ood,
        "ood_rate": ood / held if held else None,
        "default_alpha": engine.default_alpha,
    })
