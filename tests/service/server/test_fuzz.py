"""Fuzzing with schemathesis against the service's own OpenAPI schema: for every operation, schema-valid and
schema-violating requests (bounded, derandomized) must never get a 5xx, and every response must conform to
the schema (documented status, content type, body schema, headers)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from oodserve.config import Settings
from oodserve.server.app import create_app

EXAMPLES_PER_MODE = 15  # positive + negative = 30 per operation
SCORING_KEY, ADMIN_KEY = "fuzz-scoring-key", "fuzz-admin-key"
RESPONSE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def served_app(bundle_dir: Path, settings_for: Callable[..., Settings]) -> Iterator[Any]:
    """A ready app with scoring and admin keys (so the admin endpoint is reachable) and the usual small limits."""
    app = create_app(settings_for(bundle_dir, api_keys=[SCORING_KEY], admin_keys=[ADMIN_KEY], request_timeout_seconds=20))
    with TestClient(app):  # runs the lifespan: bundles loaded and warmed up
        yield app


def fuzz_operation(operation: Any, mode: GenerationMode, tally: Counter[str], failures: list[str]) -> None:
    key = ADMIN_KEY if operation.path.startswith("/v1/admin") else SCORING_KEY
    checks = [*RESPONSE_CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else RESPONSE_CHECKS

    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if "authorization" not in {name.lower() for name in (case.headers or {})}:
            case.headers = {**(case.headers or {}), "authorization": f"Bearer {key}"}
        response = case.call()
        tally["examples"] += 1
        tally[f"{response.status_code // 100}xx"] += 1
        try:
            case.validate_response(response, checks=checks)
        except Exception as error:  # noqa: BLE001 - collect every failure, report them all at the end
            failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {str(error)[:800]}")

    run()


def test_fuzzing_finds_no_server_error_and_no_schema_violation(served_app: Any) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", served_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    tally: Counter[str] = Counter()
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, tally, failures)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, f"{operation.path}: no valid request can be generated"
                tally["operations without anything to negate"] += 1  # no parameters or body to make invalid
            except Exception as error:  # noqa: BLE001 - e.g. a schema that cannot be negated: report it
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}) could not run: {error!r}"[:800])
    print(
        f"\nschemathesis: {tally['examples']} examples over {len(operations)} operations; "
        f"status classes {dict(sorted((k, v) for k, v in tally.items() if k.endswith('xx')))}; 5xx: {tally['5xx']}"
    )
    assert tally["5xx"] == 0, failures
    assert failures == [], "\n\n".join(failures)
