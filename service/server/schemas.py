"""Pydantic models of the v1 request and the error bodies, for the OpenAPI docs (the scoring and model answers are the
data plane's typed models: `oodserve.dataplane.ScoreResponse`, `ModelDescription`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ScoreRequest(BaseModel):
    """Body of POST /v1/score."""

    instances: list[list[Any]] = Field(
        description="Nested arrays of the input's per-instance shape (with or without a leading channel of 1), raw scale."
    )
    alpha: float | None = Field(None, gt=0, lt=1, description="Significance level; default: the bundle's default_alpha.")


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
