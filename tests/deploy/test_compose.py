"""deploy/compose.yaml (no Docker engine here, so its structure is checked with yaml): the CPU service and the GPU one
in a `gpu` profile with an NVIDIA device reservation, hardened like the image expects, Prometheus with the shipped
config and rules mounted and able to find the replicas, Grafana with the provisioning and dashboard mounted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from oodserve.config import Settings
from oodserve.drift.store import StoreOptions
from tests.helpers.deploy_support import DEPLOY, REPO

COMPOSE = DEPLOY / "compose.yaml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict[str, Any]) -> dict[str, Path | str]:
    """Container path -> host path (resolved against deploy/) or volume name, for every `volumes` entry."""
    found: dict[str, Path | str] = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        found[target] = (DEPLOY / source).resolve() if source.startswith(".") else source
    return found


def test_cpu_and_gpu_services_build_the_two_targets() -> None:
    services = compose()["services"]
    assert set(services) == {"oodserve", "oodserve-gpu", "prometheus", "grafana"}
    for name, target in (("oodserve", "cpu"), ("oodserve-gpu", "gpu")):
        service = services[name]
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"
        assert build["target"] == target and service["image"] == f"oodserve:{target}"
        assert (REPO / "models" / "bundles" / build["args"]["BUNDLE"] / "manifest.json").exists()
        assert service["read_only"] is True and service["tmpfs"][0].startswith("/tmp:")
        assert service["user"] == "10001:10001" and service["cap_drop"] == ["ALL"]
        assert service["networks"]["default"]["aliases"] == ["oodserve-replicas"]
        assert all(port.endswith(":8000") for port in service["ports"])
        for variable in service["environment"]:
            assert variable.startswith("OODSERVE_") and variable[len("OODSERVE_") :].lower() in Settings.model_fields
    assert "profiles" not in services["oodserve"]
    gpu = services["oodserve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert gpu["environment"]["OODSERVE_REQUIRE_GPU"] == "true"


def test_prometheus_gets_the_shipped_config_rules_and_finds_the_replicas() -> None:
    document = compose()
    prometheus = document["services"]["prometheus"]
    volumes = mounts(prometheus)
    config_flag = next(flag for flag in prometheus["command"] if flag.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    assert volumes[str(config_path.parent)] == DEPLOY / "prometheus"
    config = yaml.safe_load((DEPLOY / "prometheus" / config_path.name).read_text())
    assert all((DEPLOY / "prometheus" / rules).exists() for rules in config["rule_files"])
    (job,) = config["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    aliases = {
        alias for service in document["services"].values() for alias in service.get("networks", {}).get("default", {}).get("aliases", [])
    }
    assert discovery["names"] == ["oodserve-replicas"] and discovery["names"][0] in aliases and discovery["port"] == 8000
    assert volumes["/prometheus"] in document["volumes"]


def test_grafana_gets_the_provisioning_and_the_dashboard() -> None:
    document = compose()
    grafana = document["services"]["grafana"]
    volumes = mounts(grafana)
    assert volumes["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "oodserve.yml").read_text())["providers"]
    dashboards_in_container = providers[0]["options"]["path"]
    assert volumes[dashboards_in_container] == DEPLOY / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).relative_to(dashboards_in_container)).exists()
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in document["services"]["prometheus"]["ports"]
    assert "prometheus" in grafana["depends_on"]


def test_the_drift_store_override_persists_and_the_replicas_use_it_with_a_secret_password() -> None:
    """deploy/compose.drift-store.yaml: Valkey with its append-only file on a volume, no published port, the password
    from a compose secret (never in the file); both oodserve services point at it and wait for it to be healthy."""
    override = yaml.safe_load((DEPLOY / "compose.drift-store.yaml").read_text())
    base = compose()
    store = override["services"]["drift-store"]
    command = " ".join(store["command"])
    assert "--appendonly yes" in command and "--dir /data" in command and "--maxmemory-policy noeviction" in command
    assert '--requirepass "$$(cat /run/secrets/drift_store_password)"' in command
    assert store["secrets"] == ["drift_store_password"] and override["secrets"]["drift_store_password"] == {
        "environment": "OODSERVE_DRIFT_STORE_PASSWORD"
    }
    assert mounts(store)["/data"] in override["volumes"] and "ports" not in store
    assert store["read_only"] is True and store["cap_drop"] == ["ALL"]
    for name in ("oodserve", "oodserve-gpu"):
        assert name in base["services"]
        service = override["services"][name]
        assert service["environment"]["OODSERVE_DRIFT_STORE"] == "redis://drift-store:6379/0"
        assert service["environment"]["OODSERVE_DRIFT_STORE_PASSWORD"].startswith("${OODSERVE_DRIFT_STORE_PASSWORD:?")
        assert service["depends_on"]["drift-store"]["condition"] == "service_healthy"
        for variable in service["environment"]:
            assert variable[len("OODSERVE_") :].lower() in Settings.model_fields
        assert StoreOptions.from_settings(Settings(drift_store=service["environment"]["OODSERVE_DRIFT_STORE"])).url.startswith("redis://")
