"""Pydantic models of the v1 request and responses, used for the OpenAPI docs (responses are built by hand)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ScoreRequest(BaseModel):
    """Body of POST /v1/score."""

    instances: list[list[Any]] = Field(
        description="Nested arrays of the input's per-instance shape (with or without a leading channel of 1), raw scale."
    )
    alpha: float | None = Field(None, gt=0, lt=1, description="Significance level; default: the bundle's default_alpha.")


class Prediction(BaseModel):
    class_index: int
    label: str
    confidence: float


class InstanceResult(BaseModel):
    is_ood: bool = Field(description="p_value < alpha")
    score: float = Field(description="Fused statistic, higher = more OOD.")
    p_value: float = Field(description="Conformal p-value of the fused statistic.")
    signals: dict[str, float]
    p_values: dict[str, float]
    prediction: Prediction | None = Field(None, description="Present when the bundle has a classifier.")


class BatchResult(BaseModel):
    """Batch typicality test (Nalisnick et al. 2019b), present for M >= 2 instances when the bundle has one."""

    test: str = Field(description="Always 'typicality'.")
    size: int = Field(description="M, the number of instances in the batch.")
    statistic: float | None = Field(description="|mean bits/dim of the batch - training entropy| (null when not finite).")
    p_value: float = Field(description="Conformal p-value against K disjoint batches of M held-out in-distribution inputs.")
    minimum_alpha: float = Field(description="1 / (K + 1): the smallest p-value a batch of this size can get.")
    reference_batches: int = Field(description="K, the disjoint reference batches of M.")
    threshold: float | None = Field(description="The (1 - alpha) conformal quantile of the reference statistics, for plots.")
    alpha: float
    is_ood: bool | None = Field(description="p_value < alpha: the batch as a whole is atypical; null when alpha <= minimum_alpha.")
    note: str | None = Field(None, description="Why the batch was not tested, when is_ood is null.")


class ScoreResponse(BaseModel):
    model: str
    model_version: str
    alpha: float
    results: list[InstanceResult]
    batch: BatchResult | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class V2ErrorResponse(BaseModel):
    """Open Inference Protocol v2 error body."""

    error: str


def v2_error_responses(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """The same documented statuses with the v2 error body (v2 answers 400 where v1 answers 422)."""
    return {
        (400 if status == 422 else status): {"model": V2ErrorResponse, "description": doc.get("description", "")}
        for status, doc in responses.items()
    }


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of a route: each error status with the v1 error body and what it means."""
    return {status: {"model": ErrorResponse, "description": description} for status, description in descriptions.items()}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = error_responses({
    400: "Malformed body (not JSON).",
    404: "Unknown model.",
    413: "Body or batch too large.",
    415: "Content type is not application/json.",
    422: "Wrong shape, dtype, NaN/Inf, out-of-range values, empty batch, invalid alpha or alpha below the bundle's resolution.",
    503: "Not ready yet.",
})
