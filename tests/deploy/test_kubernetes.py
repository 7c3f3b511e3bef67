"""deploy/k8s: every manifest passes kubernetes-validate (strict, offline schemas), and the pieces fit together:
probes on /healthz and /readyz, non-root read-only pods with an emptyDir /tmp, a GPU variant, the Service, HPA, PDB
and ServiceMonitor select the right pods, every OODSERVE_* variable is a real setting, and the drift store (a Valkey
StatefulSet with a PVC and AOF, its Service, a NetworkPolicy admitting only oodserve pods, a password from a Secret)
is what the oodserve Deployments point at."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from oodserve.config import Settings
from tests.helpers.deploy_support import DEPLOY

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"
CORE_MANIFESTS = ("deployment.yaml", "deployment-gpu.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "drift-store.yaml")


def documents(name: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all((K8S / name).read_text()) if document]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {document["metadata"]["name"]: document for name in CORE_MANIFESTS for document in documents(name) if document["kind"] == kind}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("name", CORE_MANIFESTS)
def test_manifest_is_valid_kubernetes(name: str) -> None:
    for document in documents(name):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_broken_deployment() -> None:
    (deployment,) = documents("deployment.yaml")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", ["oodserve", "oodserve-gpu"])
def test_deployment_probes_security_and_tmp(name: str) -> None:
    deployment = by_kind("Deployment")[name]
    pod = deployment["spec"]["template"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    spec = pod["spec"]
    (container,) = spec["containers"]
    port = {item["name"]: item["containerPort"] for item in container["ports"]}["http"]
    assert port == 8000
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert set(container["resources"]["requests"]) >= {"cpu", "memory"} and set(container["resources"]["limits"]) >= {"cpu", "memory"}
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001  # the image's USER
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]] and set(mounts) == {"/tmp"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    settings = set(Settings.model_fields)
    for variable in container["env"]:
        assert variable["name"].startswith("OODSERVE_") and variable["name"][len("OODSERVE_") :].lower() in settings, variable


def test_gpu_variant_requests_a_gpu_and_runs_the_gpu_image() -> None:
    deployments = by_kind("Deployment")
    gpu = deployments["oodserve-gpu"]["spec"]["template"]
    (container,) = gpu["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith(":gpu") and gpu["metadata"]["labels"]["accelerator"] == "gpu"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["spec"]["tolerations"]
    (cpu_container,) = deployments["oodserve"]["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"] and cpu_container["image"].endswith(":cpu")


def test_service_hpa_pdb_and_service_monitor_select_the_pods() -> None:
    deployments = by_kind("Deployment")
    pod_labels = {name: deployment["spec"]["template"]["metadata"]["labels"] for name, deployment in deployments.items()}
    service = by_kind("Service")["oodserve"]
    assert all(selects(service["spec"]["selector"], labels) for labels in pod_labels.values())
    assert {port["name"]: port["targetPort"] for port in service["spec"]["ports"]} == {"http": "http", "grpc": "grpc"}
    for deployment in deployments.values():  # every named target port exists on the pods, gRPC switched on at its port
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        environment = {item["name"]: item.get("value") for item in container["env"]}
        assert set(ports) == {"http", "grpc"} and environment["OODSERVE_GRPC_PORT"] == str(ports["grpc"])
    for hpa in by_kind("HorizontalPodAutoscaler").values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    budgets = by_kind("PodDisruptionBudget").values()
    for budget in budgets:
        matched = [name for name, labels in pod_labels.items() if selects(budget["spec"]["selector"]["matchLabels"], labels)]
        assert len(matched) == 1, budget["metadata"]["name"]
    assert len(budgets) == len(deployments)
    (monitor,) = documents("servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor" and selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["http"]
    assert monitor["spec"]["podTargetLabels"] == ["accelerator"]


def test_kustomization_lists_every_core_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(CORE_MANIFESTS)
    assert all((K8S / name).exists() for name in kustomization["resources"])
    assert {path.name for path in K8S.glob("*.yaml")} == {*CORE_MANIFESTS, "servicemonitor.yaml", "kustomization.yaml"}


def test_the_drift_store_persists_admits_only_oodserve_pods_and_the_deployments_use_it() -> None:
    (store,) = by_kind("StatefulSet").values()
    pod = store["spec"]["template"]
    assert selects(store["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]) and store["spec"]["replicas"] == 1
    (container,) = pod["spec"]["containers"]
    arguments = container["args"]
    assert arguments[arguments.index("--appendonly") + 1] == "yes" and arguments[arguments.index("--dir") + 1] == "/data"
    assert arguments[arguments.index("--maxmemory-policy") + 1] == "noeviction"  # oodserve evicts whole streams itself
    (claim,) = store["spec"]["volumeClaimTemplates"]
    assert {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]} == {"/data": claim["metadata"]["name"]}
    secret_of = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"] if "valueFrom" in item}
    assert arguments[arguments.index("--requirepass") + 1] == "$(VALKEY_PASSWORD)" and "VALKEY_PASSWORD" in secret_of
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["spec"]["securityContext"]["runAsNonRoot"] is True
    service = by_kind("Service")[store["spec"]["serviceName"]]
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    (policy,) = by_kind("NetworkPolicy").values()
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"]) and policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"} and [item["port"] for item in rule["ports"]] == [port["targetPort"]]
    for name, deployment in by_kind("Deployment").items():
        assert selects(source["podSelector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]), name
        (scorer,) = deployment["spec"]["template"]["spec"]["containers"]
        environment = {item["name"]: item for item in scorer["env"]}
        url = environment["OODSERVE_DRIFT_STORE"]["value"]
        assert url == f"redis://{service['metadata']['name']}:{port['port']}/0", name
        assert environment["OODSERVE_DRIFT_STORE_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret_of["VALKEY_PASSWORD"], name
        assert Settings(drift_store=url).drift_store == url
