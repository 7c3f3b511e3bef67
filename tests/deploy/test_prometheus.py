"""deploy/prometheus: promtool accepts the config and rules, the alert rules fire on the right synthetic series,
and a real Prometheus scrapes the running service and answers oodserve_inputs_scored_total through its query API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from oodserve.datasets import load_images
from tests.helpers.deploy_support import FASHION_MNIST, PROMETHEUS_DIR, LiveStack, http_get, tool

RULE_CASES = Path(__file__).with_name("alert_rule_cases.yml")


def run_promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *arguments], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    config = run_promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = run_promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 13 rules found" in rules.stdout + rules.stderr


def test_the_issue_alerts_are_present() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    for name in (
        "OodserveOodRateFarAboveAlpha",
        "OodserveFusedPValuesNotUniform",
        "OodserveDriftMartingaleAlarm",
        "OodserveDriftChangeDetected",
        "OodserveDriftStoreUnavailable",
        "OodserveHighErrorRate",
        "OodserveHighP99Latency",
        "OodserveRunningOnCpuWhereGpuExpected",
    ):
        assert name in alerts
        assert alerts[name]["labels"]["severity"] in {"info", "warning", "critical"}
        assert alerts[name]["annotations"]["summary"]


def test_alert_rules_fire_on_synthetic_series(tmp_path: Path) -> None:
    """promtool test rules on the shipped rules (annotations dropped: check rules validates their templates)."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(yaml.safe_dump(rules))
    cases = RULE_CASES.read_text().replace("RULES_FILE", str(rules_path))
    cases_path = tmp_path / "cases.yml"
    cases_path.write_text(cases)
    result = run_promtool("test", "rules", str(cases_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_scrapes_scored_instances_from_the_service(live_stack: LiveStack) -> None:
    assert live_stack.scalar("sum(oodserve_inputs_scored_total)") == live_stack.scored == 10
    ood = live_stack.scalar(f'oodserve_inputs_scored_total{{model="{live_stack.model}",verdict="ood"}}')
    in_distribution = live_stack.scalar(f'oodserve_inputs_scored_total{{model="{live_stack.model}",verdict="in_distribution"}}')
    assert (ood, in_distribution) == (live_stack.ood, live_stack.scored - live_stack.ood)
    assert 4 <= live_stack.ood < 10  # the noise images are OOD, most Fashion-MNIST ones are not
    target = json.loads(http_get(f"{live_stack.prometheus_url}/api/v1/targets")[1])["data"]["activeTargets"]
    assert [(item["labels"]["job"], item["health"]) for item in target] == [("oodserve", "up")]
    info = live_stack.query("oodserve_model_info")["data"]["result"]
    assert [(item["metric"]["model"], item["metric"]["provider"]) for item in info] == [(live_stack.model, "CPUExecutionProvider")]


def test_alert_rules_evaluate_cleanly_on_live_data(live_stack: LiveStack) -> None:
    """Every rule of the shipped file is loaded by the server and evaluates without error against real series."""
    deadline = time.monotonic() + 20
    while True:
        groups = json.loads(http_get(f"{live_stack.prometheus_url}/api/v1/rules")[1])["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] == "ok" for rule in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rules) == 13
    assert {rule["name"]: (rule["health"], rule.get("lastError", "")) for rule in rules} == {
        rule["name"]: ("ok", "") for rule in rules
    }
    # Each alert expression also runs as a query (no vector-matching errors with the real label sets).
    shipped = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in shipped["groups"]:
        for rule in group["rules"]:
            answer = live_stack.query(rule["expr"])
            assert answer["status"] == "success", (rule["alert"], answer)


MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists() or not MNIST.exists(),
                    reason="needs the Debian Fashion-MNIST package and the shared MNIST test set")
def test_prometheus_sees_the_drift_alarm_of_an_mnist_stream_and_none_on_fashion_mnist(live_stack: LiveStack) -> None:
    """Last in this file: it sends more traffic than the counts above expect."""

    streams = {"fashion": load_images(FASHION_MNIST, "t10k").images[1000:1400], "mnist": load_images(MNIST, "t10k").images[:400]}
    for stream, images in streams.items():
        for start in range(0, len(images), 100):
            request = urllib.request.Request(
                f"{live_stack.service_url}/v1/score",
                data=json.dumps({"instances": images[start : start + 100].reshape(-1, 1, 28, 28).tolist()}).encode(),
                headers={"content-type": "application/json", "x-ood-stream": stream},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.status == 200
    drift = json.loads(http_get(f"{live_stack.service_url}/v1/models/{live_stack.model}/drift")[1])
    by_stream = {item["stream"]: item for item in drift["streams"]}
    assert by_stream["mnist"]["alarm"] and not by_stream["fashion"]["alarm"], by_stream

    def alarm(stream: str) -> float | None:
        return live_stack.scalar(f'oodserve_drift_alarm{{model="{live_stack.model}",stream="{stream}",test="martingale"}}')

    deadline = time.monotonic() + 30
    while alarm("mnist") != 1.0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alarm("mnist") == 1.0 and alarm("fashion") == 0.0
    firing = live_stack.query('ALERTS{alertname="OodserveDriftMartingaleAlarm"}')["data"]["result"]
    assert "fashion" not in {item["metric"]["stream"] for item in firing}  # the fixture's stream sent noise: it may fire
