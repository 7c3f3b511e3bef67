"""Every domain error maps to one HTTP error (server.errors.DOMAIN_ERRORS), worded in the envelope of the
router that served the request, also for errors the limits middleware sends before routing."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from oodserve.engine import NotReadyError, UnknownModelError
from oodserve.runtime.batching import DeadlineExceededError, QueueFullError
from oodserve.scoring.inputs import InputError
from oodserve.server.app import create_app
from oodserve.server.errors import DOMAIN_ERRORS, V1_ENVELOPE, V2_ENVELOPE, as_api_error
from oodserve.server.reload import BundleRefusedError, ReloadFailedError, ReloadInProgressError, ReloadNotReadyError


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InputError("invalid_shape", "bad shape"), 422, "invalid_shape"),
        (InputError("too_many_instances", "too many"), 413, "too_many_instances"),
        (QueueFullError("queue full", retry_after_s=3), 503, "overloaded"),
        (DeadlineExceededError("too late"), 504, "deadline_exceeded"),
        (NotReadyError("starting"), 503, "not_ready"),
        (UnknownModelError("model_not_found", "no such model"), 404, "model_not_found"),
        (UnknownModelError("version_not_found", "no such version"), 404, "version_not_found"),
        (ReloadInProgressError("busy"), 409, "reload_in_progress"),
        (ReloadNotReadyError("starting"), 503, "not_ready"),
        (BundleRefusedError("refused"), 422, "bundle_refused"),
        (ReloadFailedError("failed"), 500, "reload_failed"),
    ],
)
def test_each_domain_error_has_one_status_and_code(error: Exception, status: int, code: str) -> None:
    mapped = as_api_error(error)
    assert (mapped.status_code, mapped.code, mapped.message) == (status, code, str(error))
    assert any(isinstance(error, cls) for cls in DOMAIN_ERRORS)


def test_queue_full_carries_retry_after() -> None:
    assert as_api_error(QueueFullError("queue full", retry_after_s=7)).headers == {"Retry-After": "7"}


def test_a_plain_exception_is_not_a_domain_error() -> None:
    with pytest.raises(TypeError):
        as_api_error(RuntimeError("boom"))


def test_envelopes_word_errors_their_way() -> None:
    assert orjson.loads(V1_ENVELOPE.body("bad", "why")) == {"error": {"code": "bad", "message": "why"}}
    assert orjson.loads(V2_ENVELOPE.body("bad", "why")) == {"error": "why"}
    assert V2_ENVELOPE.status(422) == 400 and V1_ENVELOPE.status(422) == 422


def test_the_limits_middleware_words_errors_like_the_route_it_guards(bundle_dir: Path, settings_for) -> None:
    with TestClient(create_app(settings_for(bundle_dir, max_body_bytes=2048))) as client:
        too_large = b"x" * 4096
        v1 = client.post("/v1/score", content=too_large, headers={"content-type": "application/json"})
        v2 = client.post("/v2/models/test-bundle/infer", content=too_large, headers={"content-type": "application/json"})
        unknown_v2 = client.post("/v2/no/such/route", content=too_large)
    assert v1.status_code == 413 and v1.json()["error"]["code"] == "body_too_large"
    assert v2.status_code == 413 and isinstance(v2.json()["error"], str) and "limit" in v2.json()["error"]
    assert unknown_v2.status_code == 413 and isinstance(unknown_v2.json()["error"], str)
