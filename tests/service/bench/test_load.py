"""`oodserve bench --load` with tiny counts: the bounded load run against loopback servers, its error
accounting (503 backpressure is not an error) and its memory readings. Figures are printed, not asserted."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oodserve.bench.load import LoadOptions, LoadReport, format_load_report, require_loopback, resident_memory_kib, run_load
from oodserve.cli import app as cli_app
from oodserve.config import Settings
from oodserve.server.app import create_app
from tests.helpers.live_server import uvicorn_in_thread


def test_bench_load_runs_a_bounded_load_against_its_own_server(bundle_dir: Path) -> None:
    result = CliRunner().invoke(
        cli_app,
        ["bench", "--load", "--bundle", str(bundle_dir), "--load-requests", "120", "--load-concurrency", "8", "--warmup-requests", "10"],
    )
    print(result.output)
    assert result.exit_code == 0, result.output
    assert "120 of 120 requests sent at concurrency 8" in result.output
    assert "statuses   200: 120" in result.output and "errors     0 " in result.output
    assert "growth +" in result.output or "growth -" in result.output  # the server's RSS was read


def test_load_against_a_running_server_counts_refusals_as_errors(
    bundle_dir: Path, settings_for: Callable[..., Settings]
) -> None:
    app = create_app(settings_for(bundle_dir, api_keys=["right-key"], max_body_bytes=1024))
    options = {"url": None, "concurrency": 4, "warmup_requests": 2, "api_key": "right-key", "body": "npy", "distinct_bodies": 8}
    with uvicorn_in_thread(app) as base_url:
        options["url"] = base_url
        good = run_load(LoadOptions(**options, server_pid=os.getpid(), requests=60))  # type: ignore[arg-type]
        assert good.statuses == Counter({200: 60}) and good.errors == 0
        assert good.rss_after_warmup_kib is not None and good.rss_end_kib is not None
        assert good.rss_peak_during_run_kib is not None and good.rss_peak_during_run_kib >= good.rss_after_warmup_kib
        too_large = run_load(LoadOptions(**options, requests=20, instances_per_request=2))  # type: ignore[arg-type]
        assert too_large.statuses == Counter({413: 20}) and too_large.errors == 20
        assert too_large.rss_growth_kib is None and "growth n/a" in format_load_report(too_large)
        with pytest.raises(ValueError, match="cannot read the served models"):
            run_load(LoadOptions(**{**options, "api_key": "wrong-key"}, requests=5))  # type: ignore[arg-type]


def test_time_bound_stops_the_run(bundle_dir: Path, settings_for: Callable[..., Settings]) -> None:
    with uvicorn_in_thread(create_app(settings_for(bundle_dir))) as base_url:
        report = run_load(LoadOptions(url=base_url, requests=1_000_000, concurrency=2, warmup_requests=0, max_seconds=1.0))
    assert report.stopped_at_time_bound and 0 < report.sent < 1_000_000 and report.errors == 0
    assert "(stopped at the time bound)" in format_load_report(report)


def test_backpressure_is_not_an_error() -> None:
    report = LoadReport(requests_planned=11, concurrency=1, instances_per_request=1)
    report.statuses.update({200: 5, 503: 3, 500: 1})
    report.transport_errors.update({"ReadError": 2})
    assert report.sent == 11 and report.errors == 3


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.3.2.1:1", "http://[::1]:8000", "http://localhost:80"])
def test_loopback_targets_are_accepted(url: str) -> None:
    require_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "https://8.8.8.8", "not a url"])
def test_other_targets_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        require_loopback(url)


def test_resident_memory_of_this_process_is_read() -> None:
    memory = resident_memory_kib(os.getpid())
    assert memory is not None and 0 < memory[0] <= memory[1]
    assert resident_memory_kib(2**22 + 12345) is None  # no such process
