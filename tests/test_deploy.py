"""deploy/: every overlay renders with `kubectl kustomize`; the built-in kinds validate against
Kubernetes' schemas (kubernetes-validate, strict), the InferencePool against its CRD's schema
(tests/data/inferencepool-v1.schema.json, from the upstream CRD: see its $comment); and the
pieces fit together: labels the router selects on, probes, drain, volumes, the router's configs."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.32.0"  # the oldest release the manifests are validated for
POOL_SCHEMA = json.loads((Path(__file__).parent / "data" / "inferencepool-v1.schema.json").read_text())
RELEASE = "reft-serve"  # the Helm release name deploy/router/values.yaml expects


def kustomize_command() -> list[str]:
    """`kubectl kustomize` with kustomize v4 or later (the overlays use `patches` and `labels`)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client; or kubernetes.io)")
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True).stdout
    version = json.loads(out or "{}").get("kustomizeVersion", "")
    major = re.match(r"v(\d+)", version)
    if not major or int(major.group(1)) < 4:
        pytest.skip(f"kubectl's kustomize {version or '(unknown)'} is older than v4")
    return [kubectl, "kustomize"]


def render(overlay: str) -> list[dict]:
    out = subprocess.run([*kustomize_command(), str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def strict(schema: dict) -> dict:
    """The schema as the API server's strict field validation applies it: no unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if "properties" in node:
            node.setdefault("additionalProperties", False)
            for child in node["properties"].values():
                walk(child)
        if isinstance(node.get("items"), dict):
            walk(node["items"])

    walk(schema)
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = render(overlay)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PersistentVolumeClaim", "InferencePool"}
    for doc in docs:
        if doc["kind"] == "InferencePool":
            assert doc["apiVersion"] == "inference.networking.k8s.io/v1"
            jsonschema.validate(doc, strict(POOL_SCHEMA))
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)

    deployment, pool, service = one(docs, "Deployment"), one(docs, "InferencePool"), one(docs, "Service")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert labels["llm-d.ai/engine-type"] == "vllm"
    assert deployment["spec"]["replicas"] >= 2
    for selector in (pool["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    (server,) = pod["spec"]["containers"]
    env = env_of(server)
    port = int(env["REFT_PORT"])
    assert [p["containerPort"] for p in server["ports"]] == [port] and env["REFT_HOST"] == "0.0.0.0"
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port]
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert server["livenessProbe"]["httpGet"]["path"] == "/live"
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(pre_stop[1]) + int(env["REFT_DRAIN_SECONDS"])
    # the registry: one ReadWriteMany claim, mounted where REFT_ADAPTERS points
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (volume,) = [v for v in pod["spec"]["volumes"]
                 if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
    assert {"name": volume["name"], "mountPath": env["REFT_ADAPTERS"]} in server["volumeMounts"]
    # the endpoint picker is the Helm release of deploy/router/values.yaml
    assert pool["spec"]["endpointPickerRef"]["name"] == f"{RELEASE}-epp"
    gpus = server.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpus == "1" and server["resources"]["requests"]["nvidia.com/gpu"] == "1" and env["REFT_DEVICE"] == "cuda"
    else:
        assert gpus is None and env["REFT_DEVICE"] == "cpu"


def test_overlays_include_cpu_and_gpu():
    assert {"cpu", "gpu"} <= set(OVERLAYS)


def scheduler_config(config: dict) -> None:
    """An EndpointPickerConfig that reads our vLLM-named metrics and scores adapter affinity."""
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    assert "lora-affinity-scorer" in plugins
    extractor = plugins["core-metrics-extractor"]["parameters"]["engineConfigs"]
    (vllm,) = [e for e in extractor if e["name"] == "vllm"]
    assert vllm["loraSpec"] == "vllm:lora_requests_info" and vllm["kvUsageSpec"] == "vllm:kv_cache_usage_perc"
    assert (vllm["queuedRequestsSpec"], vllm["runningRequestsSpec"]) == (
        "vllm:num_requests_waiting", "vllm:num_requests_running")
    (profile,) = config["schedulingProfiles"]
    refs = {p["pluginRef"]: p.get("weight", 1) for p in profile["plugins"]}
    assert refs["lora-affinity-scorer"] > 0
    assert set(refs) <= set(plugins)


def test_router_helm_values_turn_on_lora_affinity():
    values = yaml.safe_load((DEPLOY / "router" / "values.yaml").read_text())["router"]
    pool = yaml.safe_load((DEPLOY / "base" / "inferencepool.yaml").read_text())
    assert values["modelServers"]["type"] == "vllm"
    assert values["modelServers"]["matchLabels"] == pool["spec"]["selector"]["matchLabels"]
    ports = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert [p["number"] for p in values["modelServers"]["targetPorts"]] == ports
    assert values["inferencePool"]["create"] is False  # deploy/base ships the pool
    config = values["epp"]["pluginsCustomConfig"][values["epp"]["pluginsConfigFile"]]
    scheduler_config(yaml.safe_load(config))


def test_router_file_discovery_configuration():
    here = DEPLOY / "router" / "file-discovery"
    config = yaml.safe_load((here / "epp-config.yaml").read_text())
    scheduler_config(config)
    discovery = {p["name"]: p for p in config["plugins"] if "name" in p}[config["dataLayer"]["discovery"]["pluginRef"]]
    assert discovery["type"] == "file-discovery" and Path(discovery["parameters"]["path"]).name == "endpoints.yaml"
    endpoints = yaml.safe_load((here / "endpoints.yaml").read_text())["endpoints"]
    assert len({e["name"] for e in endpoints}) == len(endpoints) >= 2
    for e in endpoints:  # the plugin's rules: a literal IPv4 address, the port a string 1-65535
        assert isinstance(ipaddress.ip_address(e["address"]), ipaddress.IPv4Address)
        assert isinstance(e["port"], str) and 1 <= int(e["port"]) <= 65535
        assert e["labels"]["llm-d.ai/engine-type"] == "vllm"


def test_the_validation_catches_a_misspelt_field():
    docs = render("cpu")
    deployment, pool = one(docs, "Deployment"), one(docs, "InferencePool")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    pool["spec"]["targetPort"] = 8000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, strict(POOL_SCHEMA))
