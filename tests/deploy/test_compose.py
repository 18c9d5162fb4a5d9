"""docker-compose.yml: valid against the Compose Specification's JSON schema, and the rules the
schema cannot express.

The schema is vendored (deploy/schemas/compose-spec.json, see compose-spec.README.md next to
it), so this runs offline and without Docker. The rules, each a function that returns the
problems it finds:

- every service has a healthcheck, and every depends_on waits for service_healthy on a
  service that has one (a profile-only service is never a dependency of an always-on one);
- every image is pinned to a version tag (no ``latest``, no tag without a digit) or a digest;
- every published port is bound to 127.0.0.1; the policy server publishes gRPC and HTTP;
- every bind-mounted file or directory and every build context / Dockerfile exists in the
  repository, and every named volume is declared;
- Redis persists (append-only file on a named volume);
- the drain settings agree: GR2_DRAIN_MIN_S <= GR2_SHUTDOWN_GRACE_S < stop_grace_period;
- the GPU service (a GPU device reservation) runs only in the ``gpu`` profile;
- Prometheus' scrape targets and the agent's --server name compose services and ports those
  serve; Prometheus' config and rule files, and Grafana's provisioning and dashboards, are
  mounted where the configs expect them; Grafana's data source points at Prometheus.

Every rule is shown to catch a violation on a mutated copy of the real file.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.processes import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SCHEMA_FILE = REPO_ROOT / "deploy" / "schemas" / "compose-spec.json"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = REPO_ROOT / "deploy" / "grafana" / "provisioning"
GRAFANA_DATASOURCE = GRAFANA_PROVISIONING / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS_PROVIDER = GRAFANA_PROVISIONING / "dashboards" / "gr2.yml"

Compose = dict[str, Any]

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def load_compose() -> Compose:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def interpolate_defaults(value: str) -> str:
    """``${VAR:-default}`` -> default, ``${VAR}`` -> "" (what compose uses with VAR unset)."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def parse_duration(value: str | int | float) -> float:
    """Compose durations ("15s", "1m30s", "600s") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def services(compose: Compose) -> dict[str, dict[str, Any]]:
    return compose.get("services") or {}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def profiles(service: dict[str, Any]) -> list[str]:
    return list(service.get("profiles") or [])


def depends_on(service: dict[str, Any]) -> dict[str, Any]:
    deps = service.get("depends_on") or {}
    return {name: None for name in deps} if isinstance(deps, list) else dict(deps)


def mounts(service: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each volume entry in long form: type, source, target (short syntax converted)."""
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            yield entry
            continue
        source, _, rest = entry.partition(":")
        target = rest.split(":")[0] if rest else source
        if not rest:  # an anonymous volume: "/path"
            yield {"type": "volume", "source": None, "target": target}
        elif source.startswith((".", "/", "~")):
            yield {"type": "bind", "source": source, "target": target}
        else:
            yield {"type": "volume", "source": source, "target": target}


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host_ip, published, target) of each published port ("" where not given)."""
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.append(
                (
                    str(entry.get("host_ip", "")),
                    str(entry.get("published", "")),
                    str(entry["target"]),
                )
            )
            continue
        spec = str(entry).split("/")[0]
        if spec.startswith("["):  # [::1]:8000:8000
            host_ip, _, rest = spec[1:].partition("]:")
            published, _, target = rest.partition(":")
        else:
            parts = spec.split(":")
            host_ip, published, target = (
                parts if len(parts) == 3 else ["", *parts] if len(parts) == 2 else ["", "", spec]
            )
        out.append((host_ip, published, target))
    return out


def dockerfile_exposed_ports(service: dict[str, Any]) -> set[str]:
    build = service.get("build")
    if not isinstance(build, dict) or "dockerfile" not in build:
        return set()
    path = REPO_ROOT / build.get("context", ".") / build["dockerfile"]
    if not path.is_file():
        return set()
    ports: set[str] = set()
    for line in path.read_text().splitlines():
        if line.strip().upper().startswith("EXPOSE "):
            ports.update(p.split("/")[0] for p in line.split()[1:])
    return ports


#: Ports the third-party images serve (their own EXPOSE; compose does not repeat them).
_IMAGE_PORTS = {"redis": {"6379"}, "prom/prometheus": {"9090"}, "grafana/grafana": {"3000"}}


def container_ports(service: dict[str, Any]) -> set[str]:
    """The ports a service's container listens on, as far as the files say."""
    ports = {target for _, _, target in published_ports(service)}
    ports.update(str(p).split("/")[0] for p in service.get("expose") or [])
    ports.update(dockerfile_exposed_ports(service))
    repository = str(service.get("image", "")).split("@")[0].rsplit(":", 1)[0]
    ports.update(_IMAGE_PORTS.get(repository, set()))
    return ports


def _split_image(ref: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference."""
    name, _, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = name.rsplit(":", 1)
        return repository, tag, digest or None
    return name, None, digest or None


# --- the rules --------------------------------------------------------------------------------


def schema_problems(compose: Compose) -> list[str]:
    # draft-07 (its "$schema" URI is not one jsonschema recognises, so name the draft).
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA_FILE.read_text()))
    return [
        f"{error.json_path}: {error.message}"
        for error in sorted(validator.iter_errors(compose), key=lambda e: e.json_path)
    ]


def healthcheck_problems(compose: Compose) -> list[str]:
    problems = []
    for name, svc in services(compose).items():
        check = svc.get("healthcheck")
        if not check or check.get("disable") in (True, "true"):
            problems.append(f"{name}: no healthcheck")
            continue
        test = check.get("test")
        if not test or (isinstance(test, list) and test[0] == "NONE"):
            problems.append(f"{name}: healthcheck without a test")
    return problems


def depends_on_problems(compose: Compose) -> list[str]:
    problems = []
    svcs = services(compose)
    for name, svc in svcs.items():
        for dep, spec in depends_on(svc).items():
            condition = (spec or {}).get("condition")
            if condition != "service_healthy":
                problems.append(
                    f"{name}: depends_on {dep} with condition {condition!r}, not service_healthy"
                )
            if dep not in svcs:
                problems.append(f"{name}: depends_on {dep}, which is not a service")
                continue
            if not svcs[dep].get("healthcheck"):
                problems.append(f"{name}: depends_on {dep}, which has no healthcheck")
            if profiles(svcs[dep]) and not set(profiles(svcs[dep])) >= set(profiles(svc) or [""]):
                problems.append(
                    f"{name}: depends_on {dep}, which runs only in profiles {profiles(svcs[dep])}"
                )
    return problems


def image_problems(compose: Compose) -> list[str]:
    problems = []
    for name, svc in services(compose).items():
        ref = svc.get("image")
        if not ref:
            problems.append(f"{name}: no image (name and tag it, even when it is built here)")
            continue
        _, tag, digest = _split_image(interpolate_defaults(str(ref)))
        if digest:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                problems.append(f"{name}: malformed digest in {ref!r}")
            continue
        if tag is None:
            problems.append(f"{name}: image {ref!r} has no tag (means latest)")
        elif tag == "latest" or not re.search(r"\d", tag):
            problems.append(f"{name}: image {ref!r} is not pinned to a version tag")
    return problems


def port_problems(compose: Compose) -> list[str]:
    problems = []
    for name, svc in services(compose).items():
        for host_ip, published, target in published_ports(svc):
            if host_ip != "127.0.0.1":
                problems.append(
                    f"{name}: port {target} published on {host_ip or 'every address'} "
                    f"(host {published or 'random'}), not 127.0.0.1"
                )
    server = services(compose).get("policy-server", {})
    targets = {target for _, _, target in published_ports(server)}
    for port in ("50051", "8000"):
        if port not in targets:
            problems.append(f"policy-server: port {port} is not published")
    return problems


def mount_problems(compose: Compose) -> list[str]:
    problems = []
    declared = set((compose.get("volumes") or {}).keys())
    for name, svc in services(compose).items():
        for mount in mounts(svc):
            if mount["type"] == "bind":
                source = mount["source"]
                path = Path(source) if source.startswith("/") else REPO_ROOT / source
                if not path.exists():
                    problems.append(f"{name}: bind-mounted {source} does not exist")
            elif mount["type"] == "volume" and mount["source"] not in (None, *declared):
                problems.append(f"{name}: volume {mount['source']} is not declared")
        build = svc.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = REPO_ROOT / build.get("context", ".")
            if not context.is_dir():
                problems.append(f"{name}: build context {build.get('context')} does not exist")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: Dockerfile {build.get('dockerfile')} does not exist")
    return problems


def redis_problems(compose: Compose) -> list[str]:
    redis = services(compose).get("redis")
    if redis is None:
        return ["no redis service"]
    problems = []
    command = redis.get("command") or []
    command = command.split() if isinstance(command, str) else [str(c) for c in command]
    if not any(a == "--appendonly" and b == "yes" for a, b in itertools.pairwise(command)):
        problems.append("redis: no --appendonly yes (episodes would not survive a restart)")
    data = [m for m in mounts(redis) if m["target"] == "/data"]
    if not data or data[0]["type"] != "volume" or data[0]["source"] is None:
        problems.append("redis: /data is not on a named volume")
    return problems


def _is_policy_server(service: dict[str, Any]) -> bool:
    build = service.get("build")
    dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
    image = _split_image(str(service.get("image", "")))[0]
    return "policy-server" in PurePosixPath(dockerfile).name or image.endswith(
        ("/policy-server", "/policy-server-gpu")
    )


def drain_problems(compose: Compose) -> list[str]:
    problems = []
    for name, svc in services(compose).items():
        if not _is_policy_server(svc):
            continue
        env = environment(svc)
        try:
            grace = float(env["GR2_SHUTDOWN_GRACE_S"])
            drain_min = float(env["GR2_DRAIN_MIN_S"])
        except (KeyError, ValueError):
            problems.append(f"{name}: GR2_SHUTDOWN_GRACE_S and GR2_DRAIN_MIN_S must be set")
            continue
        stop = parse_duration(svc.get("stop_grace_period", "10s"))  # Docker's default
        if not drain_min <= grace:
            problems.append(f"{name}: GR2_DRAIN_MIN_S {drain_min:g} > GR2_SHUTDOWN_GRACE_S")
        if not stop > grace:
            problems.append(
                f"{name}: stop_grace_period {stop:g} s is not above GR2_SHUTDOWN_GRACE_S "
                f"{grace:g} s: Docker would SIGKILL the drain"
            )
    return problems


def _uses_gpu(service: dict[str, Any]) -> bool:
    devices = (
        ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    ).get("devices") or []
    return bool(service.get("gpus")) or any(
        "gpu" in (device.get("capabilities") or []) for device in devices
    )


def gpu_problems(compose: Compose) -> list[str]:
    problems = []
    gpu_services = [name for name, svc in services(compose).items() if _uses_gpu(svc)]
    if not gpu_services:
        problems.append("no service reserves a GPU (the gpu profile's policy server)")
    for name in gpu_services:
        svc = services(compose)[name]
        if profiles(svc) != ["gpu"]:
            problems.append(f"{name}: uses a GPU but its profiles are {profiles(svc)}, not [gpu]")
        devices = svc["deploy"]["resources"]["reservations"]["devices"] if "deploy" in svc else []
        if devices and not all(d.get("driver") == "nvidia" for d in devices):
            problems.append(f"{name}: GPU reservation without driver: nvidia")
    for name, svc in services(compose).items():
        if "gpu" in profiles(svc) and not _uses_gpu(svc):
            problems.append(f"{name}: in the gpu profile but reserves no GPU")
    return problems


def _served(compose: Compose, host: str, port: str) -> str | None:
    """None when compose service ``host`` serves ``port``, else the problem."""
    svc = services(compose).get(host)
    if svc is None:
        return f"{host} is not a compose service"
    if port not in container_ports(svc):
        return f"{host} does not serve port {port} (it serves {sorted(container_ports(svc))})"
    return None


def prometheus_targets(config: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """job name -> (host, port) of each static target and each DNS-discovered name."""
    jobs: dict[str, list[tuple[str, str]]] = {}
    for job in config.get("scrape_configs") or []:
        targets = jobs.setdefault(job["job_name"], [])
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                host, _, port = target.rpartition(":")
                targets.append((host, port))
        for dns in job.get("dns_sd_configs") or []:
            targets.extend((name, str(dns.get("port", ""))) for name in dns.get("names") or [])
    return jobs


def prometheus_problems(compose: Compose, config: dict[str, Any]) -> list[str]:
    problems = []
    scraped = set()
    for job, targets in prometheus_targets(config).items():
        if not targets:
            problems.append(f"prometheus job {job}: no targets")
        for host, port in targets:
            scraped.add((host, port))
            problem = _served(compose, host, port)
            if problem:
                problems.append(f"prometheus job {job}: {problem}")
    for wanted in (("policy-server", "8000"), ("wbc-agent", "9102")):
        if wanted not in scraped:
            problems.append(f"prometheus does not scrape {wanted[0]}:{wanted[1]}")
    prometheus = services(compose).get("prometheus", {})
    by_target = {PurePosixPath(m["target"]): m for m in mounts(prometheus)}
    config_mount = by_target.get(PurePosixPath("/etc/prometheus/prometheus.yml"))
    if config_mount is None or (REPO_ROOT / config_mount["source"]).resolve() != (
        PROMETHEUS_CONFIG.resolve()
    ):
        problems.append("prometheus: deploy/prometheus/prometheus.yml is not mounted as its config")
    for pattern in config.get("rule_files") or []:
        parent = PurePosixPath(pattern).parent
        mount = by_target.get(parent)
        if mount is None or mount["type"] != "bind":
            problems.append(f"prometheus: rule_files {pattern}: {parent} is not bind-mounted")
        elif not list((REPO_ROOT / mount["source"]).glob(PurePosixPath(pattern).name)):
            problems.append(
                f"prometheus: rule_files {pattern} matches no file in {mount['source']}"
            )
    return problems


def agent_server_problems(compose: Compose) -> list[str]:
    agent = services(compose).get("wbc-agent")
    if agent is None:
        return ["no wbc-agent service"]
    command = agent.get("command") or []
    command = command.split() if isinstance(command, str) else [str(c) for c in command]
    servers = [
        interpolate_defaults(c.split("=", 1)[1]) for c in command if c.startswith("--server=")
    ]
    servers += [interpolate_defaults(b) for a, b in itertools.pairwise(command) if a == "--server"]
    servers = servers or [environment(agent).get("GR2_WBC_SERVER", "localhost:50051")]
    problems = []
    for server in servers:
        for target in server.split(","):
            host, _, port = target.strip().rpartition(":")
            problem = _served(compose, host, port)
            if problem:
                problems.append(f"wbc-agent --server {target}: {problem}")
            elif host in services(compose) and host not in depends_on(agent):
                problems.append(f"wbc-agent: --server {host} but no depends_on {host}")
    return problems


def grafana_problems(compose: Compose, datasource: Any, provider: Any) -> list[str]:
    problems = []
    grafana = services(compose).get("grafana", {})
    by_target = {m["target"].rstrip("/"): m for m in mounts(grafana)}
    sources = (datasource or {}).get("datasources") or []
    prom = [d for d in sources if d.get("type") == "prometheus"]
    if not any(d.get("uid") == "prometheus" and d.get("name") == "Prometheus" for d in prom):
        problems.append("grafana: no Prometheus data source with uid prometheus")
    for d in prom:
        m = re.fullmatch(r"https?://([^:/]+):(\d+)/?", str(d.get("url", "")))
        problem = "malformed url" if m is None else _served(compose, m.group(1), m.group(2))
        if problem:
            problems.append(f"grafana data source {d.get('name')}: {problem}")
    mount = by_target.get("/etc/grafana/provisioning")
    if mount is None or (REPO_ROOT / mount["source"]).resolve() != GRAFANA_PROVISIONING.resolve():
        problems.append("grafana: deploy/grafana/provisioning is not its /etc/grafana/provisioning")
    for p in (provider or {}).get("providers") or []:
        path = str((p.get("options") or {}).get("path", "")).rstrip("/")
        mount = by_target.get(path)
        if mount is None or mount["type"] != "bind":
            problems.append(f"grafana: dashboards path {path} is not bind-mounted")
        elif not list((REPO_ROOT / mount["source"]).glob("*.json")):
            problems.append(f"grafana: no dashboard JSON in {mount['source']}")
    return problems


def check(compose: Compose) -> dict[str, list[str]]:
    """Every rule's problems with this compose file (the other files as they are)."""
    return {
        "schema": schema_problems(compose),
        "healthcheck": healthcheck_problems(compose),
        "depends_on": depends_on_problems(compose),
        "image": image_problems(compose),
        "ports": port_problems(compose),
        "mounts": mount_problems(compose),
        "redis": redis_problems(compose),
        "drain": drain_problems(compose),
        "gpu": gpu_problems(compose),
        "prometheus": prometheus_problems(compose, load_yaml(PROMETHEUS_CONFIG)),
        "agent_server": agent_server_problems(compose),
        "grafana": grafana_problems(
            compose, load_yaml(GRAFANA_DATASOURCE), load_yaml(GRAFANA_DASHBOARDS_PROVIDER)
        ),
    }


# --- the tests --------------------------------------------------------------------------------


def test_vendored_schema_is_a_valid_draft7_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07")
    jsonschema.Draft7Validator.check_schema(schema)
    # The parts this file relies on: the schema would silently accept them if they were gone.
    service = schema["definitions"]["service"]["properties"]
    for key in ("healthcheck", "depends_on", "profiles", "deploy", "stop_grace_period"):
        assert key in service, key


@pytest.mark.parametrize(
    "rule",
    [
        "schema",
        "healthcheck",
        "depends_on",
        "image",
        "ports",
        "mounts",
        "redis",
        "drain",
        "gpu",
        "prometheus",
        "agent_server",
        "grafana",
    ],
)
def test_compose_file_passes(rule: str) -> None:
    problems = check(load_compose())[rule]
    assert not problems, "\n".join(problems)


def test_expected_services() -> None:
    compose = load_compose()
    assert set(services(compose)) == {
        "redis",
        "policy-server",
        "policy-server-gpu",
        "wbc-agent",
        "prometheus",
        "grafana",
    }
    # Without a profile: what a plain `docker compose up` starts, on a machine without a GPU.
    always = {name for name, svc in services(compose).items() if not profiles(svc)}
    assert always == set(services(compose)) - {"policy-server-gpu"}
    env = environment(services(compose)["policy-server"])
    assert env["GR2_REDIS_URL"] == "redis://redis:6379/0"
    assert "GR2_HOST" not in env or env["GR2_HOST"] == "0.0.0.0"


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    out = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- every rule catches a violation -------------------------------------------------------------


def _svc(c: Compose, name: str) -> dict[str, Any]:
    return c["services"][name]


def _set_command_server(c: Compose, value: str) -> None:
    command = _svc(c, "wbc-agent")["command"]
    _svc(c, "wbc-agent")["command"] = [
        f"--server={value}" if str(a).startswith("--server") else a for a in command
    ]


#: name -> (rule expected to object, mutation of a copy of the compose file).
MUTATIONS: dict[str, tuple[str, Callable[[Compose], None]]] = {
    "unknown service key": ("schema", lambda c: _svc(c, "redis").update(healthchek={})),
    "wrong type": ("schema", lambda c: _svc(c, "redis").update(ports="6379")),
    "bad depends_on condition": (
        "schema",
        lambda c: _svc(c, "wbc-agent")["depends_on"]["policy-server"].update(condition="ready"),
    ),
    "no healthcheck": ("healthcheck", lambda c: _svc(c, "grafana").pop("healthcheck")),
    "healthcheck disabled": (
        "healthcheck",
        lambda c: _svc(c, "redis").update(healthcheck={"disable": True}),
    ),
    "depends_on service_started": (
        "depends_on",
        lambda c: _svc(c, "wbc-agent")["depends_on"]["policy-server"].update(
            condition="service_started"
        ),
    ),
    "depends_on list form": (
        "depends_on",
        lambda c: _svc(c, "policy-server").update(depends_on=["redis"]),
    ),
    "depends_on a gpu-only service": (
        "depends_on",
        lambda c: _svc(c, "wbc-agent")["depends_on"].update(
            {"policy-server-gpu": {"condition": "service_healthy"}}
        ),
    ),
    "image latest": ("image", lambda c: _svc(c, "redis").update(image="redis:latest")),
    "image without tag": ("image", lambda c: _svc(c, "grafana").update(image="grafana/grafana")),
    "image with a branch tag": (
        "image",
        lambda c: _svc(c, "prometheus").update(image="prom/prometheus:main"),
    ),
    "registry port is no tag": (
        "image",
        lambda c: _svc(c, "policy-server").update(image="localhost:5000/gr2/policy-server"),
    ),
    "port on every address": (
        "ports",
        lambda c: _svc(c, "policy-server").update(ports=["50051:50051", "127.0.0.1:8000:8000"]),
    ),
    "port on 0.0.0.0": (
        "ports",
        lambda c: _svc(c, "grafana").update(ports=["0.0.0.0:3000:3000"]),
    ),
    "grpc port not published": (
        "ports",
        lambda c: _svc(c, "policy-server").update(ports=["127.0.0.1:8000:8000"]),
    ),
    "missing bind source": (
        "mounts",
        lambda c: _svc(c, "prometheus")["volumes"].append("./deploy/prometheus/nope.yml:/x:ro"),
    ),
    "undeclared volume": (
        "mounts",
        lambda c: _svc(c, "redis").update(volumes=["redis-state:/data"]),
    ),
    "missing Dockerfile": (
        "mounts",
        lambda c: _svc(c, "wbc-agent")["build"].update(dockerfile="deploy/docker/nope.Dockerfile"),
    ),
    "redis without appendonly": (
        "redis",
        lambda c: _svc(c, "redis").update(command=["redis-server"]),
    ),
    "redis data not on a volume": ("redis", lambda c: _svc(c, "redis").pop("volumes")),
    "stop grace below the drain": (
        "drain",
        lambda c: _svc(c, "policy-server").update(stop_grace_period="5s"),
    ),
    "Docker's default stop grace": (
        "drain",
        lambda c: _svc(c, "policy-server-gpu").pop("stop_grace_period"),
    ),
    "drain min above the grace": (
        "drain",
        lambda c: _svc(c, "policy-server")["environment"].update(GR2_DRAIN_MIN_S="30"),
    ),
    "gpu service without profile": (
        "gpu",
        lambda c: _svc(c, "policy-server-gpu").pop("profiles"),
    ),
    "gpu reserved by the cpu server": (
        "gpu",
        lambda c: _svc(c, "policy-server").update(
            deploy=copy.deepcopy(_svc(c, "policy-server-gpu")["deploy"])
        ),
    ),
    "no gpu service": (
        "gpu",
        lambda c: c["services"].pop("policy-server-gpu"),
    ),
    "scraped service renamed": (
        "prometheus",
        lambda c: c["services"].update(agent=c["services"].pop("wbc-agent")),
    ),
    "rules not mounted": (
        "prometheus",
        lambda c: _svc(c, "prometheus").update(
            volumes=[v for v in _svc(c, "prometheus")["volumes"] if "rules" not in str(v)]
        ),
    ),
    "agent to a wrong port": (
        "agent_server",
        lambda c: _set_command_server(c, "${GR2_AGENT_SERVERS:-policy-server:50052}"),
    ),
    "agent to an unknown host": (
        "agent_server",
        lambda c: _set_command_server(c, "policy:50051"),
    ),
    "agent not waiting for its server": (
        "agent_server",
        lambda c: _svc(c, "wbc-agent").pop("depends_on"),
    ),
    "grafana dashboards not mounted": (
        "grafana",
        lambda c: _svc(c, "grafana").update(
            volumes=[v for v in _svc(c, "grafana")["volumes"] if "dashboards" not in str(v)]
        ),
    ),
    "grafana's data source host gone": (
        "grafana",
        lambda c: c["services"].update(prom=c["services"].pop("prometheus")),
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_rule_catches_a_violation(mutation: str) -> None:
    rule, mutate = MUTATIONS[mutation]
    compose = load_compose()
    mutate(compose)
    assert check(compose)[rule], f"rule {rule!r} missed: {mutation}"


def test_prometheus_rule_catches_a_wrong_target() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    config["scrape_configs"][-1]["static_configs"] = [{"targets": ["wbc-agent:9999"]}]
    assert prometheus_problems(load_compose(), config)
    config = load_yaml(PROMETHEUS_CONFIG)
    config["scrape_configs"][0]["dns_sd_configs"][0]["names"].append("policy-server-cpu")
    assert prometheus_problems(load_compose(), config)


def test_grafana_rule_catches_a_wrong_datasource() -> None:
    datasource = load_yaml(GRAFANA_DATASOURCE)
    datasource["datasources"][0]["uid"] = "prom"
    assert grafana_problems(load_compose(), datasource, load_yaml(GRAFANA_DASHBOARDS_PROVIDER))
    datasource = load_yaml(GRAFANA_DATASOURCE)
    datasource["datasources"][0]["url"] = "http://prometheus:9091"
    assert grafana_problems(load_compose(), datasource, load_yaml(GRAFANA_DASHBOARDS_PROVIDER))
    provider = load_yaml(GRAFANA_DASHBOARDS_PROVIDER)
    provider["providers"][0]["options"]["path"] = "/etc/grafana/dashboards"
    assert grafana_problems(load_compose(), load_yaml(GRAFANA_DATASOURCE), provider)


def test_helpers() -> None:
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("600s") == 600.0
    with pytest.raises(ValueError):
        parse_duration("15 seconds")
    assert interpolate_defaults("--server=${X:-a:1,b:2}") == "--server=a:1,b:2"
    assert _split_image("localhost:5000/a/b:1.2@sha256:" + "0" * 64) == (
        "localhost:5000/a/b",
        "1.2",
        "sha256:" + "0" * 64,
    )
    assert published_ports({"ports": ["127.0.0.1:1:2", "3:4", "5", "[::1]:6:7/udp"]}) == [
        ("127.0.0.1", "1", "2"),
        ("", "3", "4"),
        ("", "", "5"),
        ("::1", "6", "7"),
    ]
