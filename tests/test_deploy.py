"""deploy/: every overlay renders with `kubectl kustomize`; the built-in kinds validate against
Kubernetes' schemas (kubernetes-validate, strict), the InferencePool against its CRD's schema
(tests/data/inferencepool-v1.schema.json, from the upstream CRD: see its $comment); and the
pieces fit together: labels the router selects on, probes, drain, volumes, the router's configs.
The hardening (security contexts, a read-only root with writable mounts for what the server
writes, keys from a Secret, the NetworkPolicy) is checked by `hardening_problems`, and every one of
its properties, removed, is shown to be caught."""

from __future__ import annotations

import copy
import functools
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
from pydantic import SecretStr

from server.api.dependencies import Access, check_access
from server.api.serving import ServingError
from server.config import Settings
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.32.0"  # the oldest release the manifests are validated for
POOL_SCHEMA = json.loads((Path(__file__).parent / "data" / "inferencepool-v1.schema.json").read_text())
RELEASE = "reft-serve"  # the Helm release name deploy/router/values.yaml expects
SECRET_TEMPLATE = DEPLOY / "base" / "keys-secret.template.yaml"
KEY_VARIABLES = ("REFT_API_KEY", "REFT_ADMIN_KEY", "REFT_METRICS_KEY")  # server/config.py's keys


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


@functools.cache
def kustomize(overlay: str) -> str:
    out = subprocess.run([*kustomize_command(), str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def render(overlay: str) -> list[dict]:
    """The overlay's documents, parsed afresh on each call (tests change them)."""
    return [d for d in yaml.safe_load_all(kustomize(overlay)) if d]


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


def dockerfile() -> tuple[dict[str, str], str]:
    """The Dockerfile's ENV values and its last USER, with ARG defaults substituted."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, re.M))
    env = dict(re.findall(r"(REFT_\w+)=(\S+)", " ".join(re.findall(r"^ENV (.*)$", text, re.M))))
    user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    return env, re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user)


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a pod's labels; {} selects all."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        if not {"In": present and value in e.get("values", []), "NotIn": value not in e.get("values", []),
                "Exists": present, "DoesNotExist": not present}[e["operator"]]:
            return False
    return True


def epp_pod_labels() -> dict[str, str]:
    """The labels llm-d-router's chart (routerlib _helpers.tpl, selectorLabels and modeLabels) gives
    the endpoint picker's pods for release RELEASE and deploy/router/values.yaml."""
    mode = "llm-d-router-gateway" if yaml.safe_load((DEPLOY / "router" / "values.yaml").read_text())[
        "router"]["inferencePool"].get("create", True) else "llm-d-router-standalone"
    return {mode: f"{RELEASE}-epp", "llm-d.ai/igw-mode": mode}


def secure_context(pod: dict, container: dict) -> dict:
    """The security settings the container runs with: its own securityContext over the pod's."""
    return {**pod.get("securityContext", {}), **container.get("securityContext", {})}


def under(path: str, mount: str) -> bool:
    return Path(path) == Path(mount) or Path(mount) in Path(path).parents


def hardening_problems(deployment: dict, policy: dict) -> list[str]:
    """Every hardening property of issue 21 that the rendered Deployment and NetworkPolicy lack."""
    return pod_problems(deployment) + policy_problems(deployment, policy)


def pod_problems(deployment: dict) -> list[str]:
    """The pod's: security contexts, writable paths, keys, allowed hosts."""
    problems = []
    spec = deployment["spec"]["template"]["spec"]
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    image_env, image_user = dockerfile()
    for c in spec["containers"] + spec.get("initContainers", []):
        ctx, name = secure_context(spec, c), c["name"]
        if ctx.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if ctx.get("runAsUser", 0) == 0 or f"{ctx.get('runAsUser')}:{ctx.get('runAsGroup')}" != image_user:
            problems.append(f"{name}: runs as {ctx.get('runAsUser')}:{ctx.get('runAsGroup')}, not the image's "
                            f"user {image_user}")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        caps = ctx.get("capabilities", {})
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            problems.append(f"{name}: capabilities are not all dropped: {caps}")
        if ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile is not RuntimeDefault")
        # What the server writes outside the registry, found by tracing a real server's file system
        # calls (strace) through uploads, pyreft archives, training, deletes and --compile: /tmp
        # (multipart bodies over 1 MiB spooled, pyreft archives unpacked, torch's inductor cache) and,
        # on a cache miss only, REFT_CACHE_DIR, which the image fills at build time. `make docker-test`
        # runs the image so: a read-only root, a tmpfs /tmp.
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        writable = [m["mountPath"] for m in c.get("volumeMounts", [])
                    if not m.get("readOnly") and "emptyDir" in volumes.get(m["name"], {})]
        if not any(under("/tmp", m) for m in writable):
            problems.append(f"{name}: /tmp is not a writable emptyDir")
        if not all(volumes[m["name"]]["emptyDir"].get("sizeLimit") for m in c.get("volumeMounts", [])
                   if "emptyDir" in volumes.get(m["name"], {})):
            problems.append(f"{name}: an emptyDir without a sizeLimit (filling it puts the node under disk pressure)")
        env = {e["name"]: e for e in c.get("env", [])}
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TMPDIR"):
            path = env.get(var, {}).get("value")
            if path is not None and not any(under(path, m) for m in writable):
                problems.append(f"{name}: {var}={path} is not on a writable emptyDir")
        if "TORCHINDUCTOR_CACHE_DIR" not in env:
            problems.append(f"{name}: TORCHINDUCTOR_CACHE_DIR is not set (its default depends on the user name)")
        cache = env.get("REFT_CACHE_DIR", {}).get("value")
        if cache != image_env["REFT_CACHE_DIR"] or any(under(cache, m["mountPath"])
                                                       for m in c.get("volumeMounts", [])):
            problems.append(f"{name}: REFT_CACHE_DIR={cache} is not the image's dequantised model "
                            f"({image_env['REFT_CACHE_DIR']}), left visible")
        for var in KEY_VARIABLES:
            ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
            if ref is None or "value" in env[var]:
                problems.append(f"{name}: {var} does not come from a Secret")
        if env.get("REFT_API_KEY", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("optional"):
            problems.append(f"{name}: the API key is optional: a pod could serve without one")
        if "REFT_ALLOWED_HOSTS" not in env:
            problems.append(f"{name}: REFT_ALLOWED_HOSTS is not set")
    return problems


def policy_problems(deployment: dict, policy: dict) -> list[str]:
    """The NetworkPolicy's: it selects the server pods, admits the router, the gateway's proxies and
    Prometheus to the server's port and nothing else, and lets the server reach nothing."""
    problems = []
    pod = deployment["spec"]["template"]
    spec, labels = pod["spec"], pod["metadata"]["labels"]
    if not selects(policy["spec"]["podSelector"], labels) or not policy["spec"]["podSelector"]:
        problems.append("the NetworkPolicy does not select the server pods")
    if set(policy["spec"].get("policyTypes", [])) != {"Ingress", "Egress"} or policy["spec"].get("egress"):
        problems.append("the NetworkPolicy does not deny all egress and restrict ingress")
    rules = policy["spec"].get("ingress", [])
    ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
    for rule in rules:
        peers = rule.get("from", [])
        if not peers or any("ipBlock" in p or not p.get("podSelector", {}).get("matchLabels") for p in peers):
            problems.append(f"a NetworkPolicy rule admits more than labelled pods: {peers}")
        targets = [ports.get(p.get("port"), p.get("port")) for p in rule.get("ports", [])]
        if not targets or set(targets) != set(ports.values()):
            problems.append(f"a NetworkPolicy rule admits ports {targets}, not the server's {sorted(ports.values())}")
    peers = [p for rule in rules for p in rule.get("from", [])]
    epp = [p for p in peers if "namespaceSelector" not in p and selects(p.get("podSelector", {}), epp_pod_labels())]
    if not epp:
        problems.append("the NetworkPolicy does not admit the endpoint picker's pods (in the pool's namespace)")
    gateway = [p for p in peers if "gateway.networking.k8s.io/gateway-name" in p.get("podSelector", {}).get(
        "matchLabels", {})]
    if not gateway:
        problems.append("the NetworkPolicy does not admit a Gateway's proxies")
    prometheus = [p for p in peers if selects(p.get("podSelector", {}), {"app.kubernetes.io/name": "prometheus"})]
    if not prometheus:
        problems.append("the NetworkPolicy does not admit Prometheus")
    for peer in peers:
        if not any(peer is known for known in epp + gateway + prometheus):
            problems.append(f"the NetworkPolicy admits a peer neither the router, a gateway nor Prometheus: {peer}")
    for other in (labels, {"app": "other"}, {}):
        if any(selects(p.get("podSelector", {}), other) for p in peers):
            problems.append(f"the NetworkPolicy admits pods labelled {other}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = render(overlay)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PersistentVolumeClaim", "InferencePool",
                                         "NetworkPolicy"}  # no Secret: see keys-secret.template.yaml
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_hardened(overlay):
    docs = render(overlay)
    assert hardening_problems(one(docs, "Deployment"), one(docs, "NetworkPolicy")) == []


def _drop(path: str):
    """A mutation deleting the key at a dotted path of the pod spec ("c." starts at the server container)."""
    def mutate(deployment: dict, policy: dict) -> None:
        node, keys = deployment["spec"]["template"]["spec"], path.split(".")
        if keys[0] == "c":
            node, keys = node["containers"][0], keys[1:]
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return mutate


def _set_env(name: str, entry: dict | None):
    def mutate(deployment: dict, policy: dict) -> None:
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        c["env"] = [e for e in c["env"] if e["name"] != name] + ([{"name": name, **entry}] if entry else [])
    return mutate


def _policy(change):
    def mutate(deployment: dict, policy: dict) -> None:
        change(policy["spec"])
    return mutate


def _admit(peer: dict):
    return _policy(lambda spec: spec["ingress"][0]["from"].append(peer))


def _without_peer(key: str):
    return _policy(lambda spec: spec["ingress"][0].update(
        {"from": [p for p in spec["ingress"][0]["from"] if key not in json.dumps(p)]}))


def _mount_over(path: str):
    def mutate(deployment: dict, policy: dict) -> None:
        spec = deployment["spec"]["template"]["spec"]
        spec["volumes"].append({"name": "extra", "emptyDir": {}})
        spec["containers"][0]["volumeMounts"].append({"name": "extra", "mountPath": path})
    return mutate


MUTATIONS = {
    "token mounted": _drop("automountServiceAccountToken"),
    "runAsNonRoot": _drop("securityContext.runAsNonRoot"),
    "root user": lambda d, p: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
    "privilege escalation": _drop("c.securityContext.allowPrivilegeEscalation"),
    "writable root": _drop("c.securityContext.readOnlyRootFilesystem"),
    "capabilities kept": _drop("c.securityContext.capabilities"),
    "a capability added": lambda d, p: d["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "capabilities"].update(add=["NET_RAW"]),
    "seccomp": _drop("securityContext.seccompProfile"),
    "no /tmp": lambda d, p: d["spec"]["template"]["spec"]["containers"][0].update(volumeMounts=[
        m for m in d["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] != "/tmp"]),
    "/tmp unbounded": lambda d, p: [v["emptyDir"].clear() for v in d["spec"]["template"]["spec"]["volumes"]
                                    if "emptyDir" in v],
    "inductor cache outside the mounts": _set_env("TORCHINDUCTOR_CACHE_DIR", {"value": "/var/cache/inductor"}),
    "inductor cache unset": _set_env("TORCHINDUCTOR_CACHE_DIR", None),
    "model cache hidden by a volume": _mount_over("/var/cache/reft-serve"),
    "API key literal": _set_env("REFT_API_KEY", {"value": "sk-committed"}),
    "API key optional": _set_env("REFT_API_KEY", {"valueFrom": {"secretKeyRef": {
        "name": "reft-serve-keys", "key": "api-key", "optional": True}}}),
    "admin key missing": _set_env("REFT_ADMIN_KEY", None),
    "metrics key missing": _set_env("REFT_METRICS_KEY", None),
    "allowed hosts unset": _set_env("REFT_ALLOWED_HOSTS", None),
    "policy selects nothing": _policy(lambda spec: spec.update(podSelector={"matchLabels": {"app": "other"}})),
    "policy allows egress": _policy(lambda spec: spec.update(egress=[{}])),
    "policy without egress type": _policy(lambda spec: spec.update(policyTypes=["Ingress"])),
    "any namespace admitted": _admit({"namespaceSelector": {}}),
    "an address range admitted": _admit({"ipBlock": {"cidr": "0.0.0.0/0"}}),
    "every pod of the namespace admitted": _admit({"podSelector": {}}),
    "another app admitted": _admit({"podSelector": {"matchLabels": {"app": "debug"}}}),
    "another port": _policy(lambda spec: spec["ingress"][0].update(ports=[{"port": 9000}])),
    "no router": _without_peer("llm-d-router"),
    "router looked for in every namespace": _policy(lambda spec: [
        p.update(namespaceSelector={}) for p in spec["ingress"][0]["from"] if "llm-d-router" in json.dumps(p)]),
    "no gateway": _without_peer("gateway-name"),
    "no Prometheus": _without_peer("prometheus"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_hardening_property_removed_is_caught(mutation):
    docs = render("gpu")
    deployment, policy = one(docs, "Deployment"), one(docs, "NetworkPolicy")
    MUTATIONS[mutation](deployment, policy)
    assert hardening_problems(deployment, policy), mutation


def test_network_policy_admits_the_router_by_the_labels_its_chart_gives():
    """The endpoint picker's pods, as deploy/router/values.yaml installs them, and no server pod."""
    policy = one(render("cpu"), "NetworkPolicy")
    peers = [p for rule in policy["spec"]["ingress"] for p in rule["from"]]
    admitted = [p for p in peers if selects(p["podSelector"], epp_pod_labels())]
    assert len(admitted) == 1 and "namespaceSelector" not in admitted[0]
    prometheus = {"app.kubernetes.io/name": "prometheus", "prometheus": "k8s"}
    assert [p.get("namespaceSelector") for p in peers if selects(p["podSelector"], prometheus)] == [{}]


def test_the_secret_template_holds_no_key_and_fails_closed(monkeypatch):
    """keys-secret.template.yaml: a valid Secret, outside the kustomization, with every key the
    Deployment needs and no value; applied unchanged, its empty keys refuse every call."""
    template = yaml.safe_load(SECRET_TEMPLATE.read_text())
    kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
    kustomization = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    assert SECRET_TEMPLATE.name not in kustomization["resources"]
    assert set(template["stringData"].values()) == {""} and "data" not in template
    (server,) = one(render("cpu"), "Deployment")["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in server["env"] if "valueFrom" in e}
    comments = SECRET_TEMPLATE.read_text()
    for var in KEY_VARIABLES:
        ref = refs[var]
        assert ref["name"] == template["metadata"]["name"]
        assert ref["key"] in template["stringData"] if not ref.get("optional") else ref["key"] in comments
    for var in KEY_VARIABLES:
        monkeypatch.setenv(var, "")
    settings = Settings(host="0.0.0.0")
    assert settings.api_key == SecretStr("") and settings.admin_key == SecretStr("")
    for access in (Access.API, Access.ADMIN, Access.METRICS):
        for authorization in (None, "Bearer ", "Bearer x"):
            with pytest.raises(ServingError) as refused:
                check_access(access, settings, authorization)
            assert refused.value.status == 401


def test_router_endpoint_picker_is_hardened():
    epp = yaml.safe_load((DEPLOY / "router" / "values.yaml").read_text())["router"]["epp"]
    ctx = {**epp["podSecurityContext"], **epp["securityContext"]}
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
    assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]} and ctx["seccompProfile"] == {"type": "RuntimeDefault"}


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
