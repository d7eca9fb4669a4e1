"""Kubernetes manifests: both overlays rendered by the real kustomize, validated offline against the
Kubernetes schemas, and cross-checked against what the service really exposes (routes, port, env
names, metric names) — read from the app, never restated here."""

from __future__ import annotations

import copy
import json
import os
from typing import Any
from urllib.parse import urlparse

import deploy_check
import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_check import (
    DASHBOARD,
    KUBERNETES_VERSION,
    OVERLAYS,
    ROOT,
    exported_metrics,
    known_env_names,
    render_overlay,
)

# The Prometheus Operator's CRD is not in the Kubernetes schemas: this hand-written schema pins the
# fields rellax uses (and refuses unknown ones, as the strict built-in schemas do).
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}
CUSTOM_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}
NAMESPACED = {"ConfigMap", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget",
              "HorizontalPodAutoscaler", "ServiceMonitor"}  # fmt: skip


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render_overlay(request.param)


@pytest.fixture(scope="module")
def app_routes() -> dict[str, set[str]]:
    return deploy_check.app_routes()


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def api_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "rellax")["spec"]["template"]["spec"]["containers"][0]


def config_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The env the api container gets from its ConfigMap(s) plus literal env values."""
    container = api_container(docs)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", name)["data"])  # resolves kustomize's hash-suffixed name
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def validate(doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CUSTOM_SCHEMAS:
        jsonschema.validate(doc, CUSTOM_SCHEMAS[key])
    else:  # SchemaNotFoundError for an unknown kind is a failure too: nothing passes unvalidated
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_manifest_validates_against_the_kubernetes_schemas(overlay) -> None:
    name, docs = overlay
    assert {d["kind"] for d in docs} == NAMESPACED | {"Namespace"}, name
    for doc in docs:
        try:
            validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid: {exc}")
        if doc["kind"] in NAMESPACED:
            assert doc["metadata"]["namespace"] == "rellax", (name, doc["kind"])


def test_validation_rejects_broken_manifests(overlay) -> None:
    """The schemas are really applied: a typo'd field and a wrong type both fail."""
    _, docs = overlay
    deployment = copy.deepcopy(one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    hpa = copy.deepcopy(one(docs, "HorizontalPodAutoscaler"))
    hpa["spec"]["maxReplicas"] = "six"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(hpa)
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["targetport"] = 8000
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_probes_and_ports_match_the_app(overlay, app_routes) -> None:
    name, docs = overlay
    container = api_container(docs)
    env = config_env(docs)
    from service.settings import Settings

    port = Settings(_env_file=None, **({"port": env["RELLAX_PORT"]} if "RELLAX_PORT" in env else {})).port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": port}, name
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert "GET" in app_routes.get(probe["path"], set()), (
            f"{name}: {kind} path {probe['path']} not served"
        )
        assert probe["port"] in ("http", port), (name, kind)
    # Readiness must be the dependency-checking endpoint, liveness the one that never checks Redis.
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    service = one(docs, "Service", "rellax")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, "http")]
    monitor = one(docs, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert "GET" in app_routes.get(endpoint["path"], set()), endpoint["path"]


def test_selectors_match_their_pods(overlay) -> None:
    _, docs = overlay
    pods = one(docs, "Deployment", "rellax")["spec"]["template"]["metadata"]["labels"]
    redis_pods = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", "rellax")
    assert service["spec"]["selector"].items() <= pods.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pods.items()
    assert (
        one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
    )
    assert one(docs, "Service", "rellax-redis")["spec"]["selector"].items() <= redis_pods.items()
    assert not service["spec"]["selector"].items() <= redis_pods.items()  # the API Service never hits Redis


def test_env_names_and_values_are_what_settings_accept(overlay, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.backends import BACKENDS
    from service.settings import Settings

    name, docs = overlay
    env = config_env(docs)
    secret_refs = [e for e in api_container(docs).get("env", []) if "valueFrom" in e]
    names = {k for k in env if k.startswith("RELLAX_")} | {e["name"] for e in secret_refs}
    unknown = names - known_env_names()
    assert not unknown, f"{name}: env names the app never reads: {sorted(unknown)}"
    # The values parse: set them as the real environment and build the Settings the pod would build.
    for key in [k for k in os.environ if k.startswith("RELLAX_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.backend in BACKENDS
    assert settings.backend == {"cpu": "torch", "gpu": "vllm"}[name]
    # API keys come only from the Secret, and the Secret is optional (auth off without it).
    assert [(e["name"], e["valueFrom"]["secretKeyRef"].get("optional")) for e in secret_refs] == [
        ("RELLAX_API_KEYS", True)
    ]
    # Redis URL names the in-cluster Redis Service and its port.
    url = urlparse(settings.redis_url or "")
    redis_service = one(docs, "Service", "rellax-redis")
    assert url.hostname == redis_service["metadata"]["name"]
    assert url.port == redis_service["spec"]["ports"][0]["port"]


def test_cache_dir_env_name_is_honoured(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELLAX_CACHE_DIR is read by rellax.paths, not Settings: check the behaviour, not a list."""
    from rellax.paths import cache_dir

    monkeypatch.setenv("RELLAX_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir("x") == tmp_path / "c" / "x"


def test_cache_and_tmp_are_writable_under_a_read_only_root(overlay) -> None:
    _, docs = overlay
    container = api_container(docs)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    env = config_env(docs)
    for path in (env["RELLAX_CACHE_DIR"], env["HOME"], "/tmp"):
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), path


def test_hpa_scales_the_deployment_on_an_exported_per_pod_gauge(overlay) -> None:
    _, docs = overlay
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rellax"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    exported = exported_metrics()
    metric_name = metric["pods"]["metric"]["name"]
    assert metric_name in exported, f"HPA metric {metric_name} is not exported by service.metrics"
    # A per-pod average only makes sense for a gauge (a counter would need a rate in the adapter).
    assert exported[metric_name].type == "gauge"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    assert "replicas" not in one(docs, "Deployment")["spec"], "the HPA owns the replica count"


def test_overlay_specifics(overlay) -> None:
    name, docs = overlay
    spec = one(docs, "Deployment", "rellax")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert limits["memory"]
    image, _, tag = container["image"].rpartition(":")
    assert image and tag and tag != "latest", container["image"]
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in spec["volumes"])  # /dev/shm
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in spec and "nodeSelector" not in spec
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_redis_statefulset_persists_an_append_only_file(overlay) -> None:
    _, docs = overlay
    sts = one(docs, "StatefulSet", "rellax-redis")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": data_dir} in container["volumeMounts"]
    assert sts["spec"]["serviceName"] == one(docs, "Service", "rellax-redis")["metadata"]["name"]


def test_dashboard_configmap_is_the_dashboard_file(overlay) -> None:
    _, docs = overlay
    cm = one(docs, "ConfigMap", "rellax-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    json.loads(cm["data"][DASHBOARD.name])


def test_kserve_predictor_runs_the_same_container_the_same_way(app_routes, monkeypatch) -> None:
    """k8s/kserve/inferenceservice.yaml: the GPU image as a KServe custom predictor, same env and probes."""
    from service.settings import Settings

    isvc = yaml.safe_load((ROOT / "k8s" / "kserve" / "inferenceservice.yaml").read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe routes to
    gpu = api_container(render_overlay("gpu"))
    assert container["image"] == gpu["image"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    names = {e["name"] for e in container["env"]}
    assert not names - known_env_names(), sorted(names - known_env_names())
    for key in [k for k in os.environ if k.startswith("RELLAX_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.backend == "vllm" and settings.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [settings.port]
    annotations = isvc["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(settings.port)
    assert "GET" in app_routes[annotations["prometheus.kserve.io/path"]]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"/readyz", "/healthz"} <= {p for p, methods in app_routes.items() if "GET" in methods}
    assert urlparse(settings.redis_url or "").hostname == "rellax-redis.rellax.svc.cluster.local"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_training_job_is_valid_and_wires_torchrun() -> None:
    """k8s/training/job.yaml: schema-valid, and its torchrun flags agree with the Job's shape."""
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "training" / "job.yaml").read_text()) if d]
    for doc in docs:
        validate(doc)
    service, job = one(docs, "Service", "rellax-train"), one(docs, "Job", "rellax-train")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if a.startswith("--"))
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert int(flags["nnodes"]) == spec["completions"]
    assert int(flags["nproc-per-node"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert flags["node-rank"] == "$(JOB_COMPLETION_INDEX)"
    # pod 0's DNS name through the headless Service: <job>-0.<subdomain>
    assert flags["master-addr"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert int(flags["master-port"]) == service["spec"]["ports"][0]["port"]
    assert container["args"][container["args"].index("-m") + 1 :][:3] == ["cli", "train", "rella"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= known_env_names() | {"RELLAX_DIST_TIMEOUT_S"}
