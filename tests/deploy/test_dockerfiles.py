"""The Dockerfiles in deploy/docker/ and .dockerignore follow the project's image rules.

A small Dockerfile parser (continuation lines, comments, JSON and shell forms, ARG defaults
substituted in FROM and USER) and one function per rule, each returning the problems it
finds:

- every FROM is pinned to a version tag (no ``latest``, no tag without a digit) or a digest;
- multi-stage: the final stage copies the venv built in an earlier one;
- the final stage runs as a non-root USER, set before ENTRYPOINT / CMD;
- HEALTHCHECK is present (and not NONE); EXPOSE names the service's ports;
- ENTRYPOINT is the exec form of the package's console script (checked against pyproject);
- no ADD of a URL; every COPY source exists in the build context;
- every ``pip install`` has ``--no-cache-dir``; every ``apt-get install`` runs in the same RUN
  as ``apt-get update``, with ``--no-install-recommends``, and removes /var/lib/apt/lists;
- the OCI labels title, version and revision are set;
- the images' torch is the version constraints.txt pins; the agent image never installs
  torch and fails its build if torch got in;
- containers bind to 0.0.0.0 (GR2_HOST, GR2_WBC_METRICS_HOST);
- .dockerignore keeps out .git, .venv, runs/, out/ and caches.

Every rule is shown to catch a violation on a mutated copy of a real Dockerfile. Building
the images needs a Docker engine, which the test machines do not have: docs/deployment.md
lists the commands that do.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.support.processes import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"

#: Dockerfile -> (console script of its ENTRYPOINT, the pyproject declaring it, ports).
IMAGES = {
    "policy-server.Dockerfile": (
        "gr2-policy-server",
        "services/policy_server/pyproject.toml",
        {"50051", "8000"},
    ),
    "policy-server-gpu.Dockerfile": (
        "gr2-policy-server",
        "services/policy_server/pyproject.toml",
        {"50051", "8000"},
    ),
    "wbc-agent.Dockerfile": ("gr2-wbc-agent", "services/wbc_agent/pyproject.toml", {"9102"}),
}
AGENT = "wbc-agent.Dockerfile"
#: Environment a container needs to be reachable from other containers.
BIND_ALL = {
    "policy-server.Dockerfile": "GR2_HOST",
    "policy-server-gpu.Dockerfile": "GR2_HOST",
    "wbc-agent.Dockerfile": "GR2_WBC_METRICS_HOST",
}


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined, comment lines dropped
    line: int
    stage: int  # index of the FROM it belongs to; -1 before the first FROM

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    #: stage index -> ARG defaults visible in that stage (global ARGs at index -1).
    args: dict[int, dict[str, str]] = field(default_factory=dict)

    def stage_count(self) -> int:
        return 1 + max((i.stage for i in self.instructions), default=-1)

    def final_stage(self) -> list[Instruction]:
        last = self.stage_count() - 1
        return [i for i in self.instructions if i.stage == last]

    def substitute(self, text: str, stage: int) -> str:
        """``$NAME`` / ``${NAME}`` replaced by the ARG defaults visible in ``stage``."""
        values = {**self.args.get(-1, {}), **self.args.get(stage, {})}
        return re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), text
        )


def parse(text: str) -> Dockerfile:
    instructions: list[Instruction] = []
    stage = -1
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (and parser directives) vanish, also inside continuations
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        line = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), start, stage))
    dockerfile = Dockerfile(instructions)
    global_args: dict[str, str] = {}
    for inst in instructions:
        if inst.keyword != "ARG":
            continue
        name, _, default = inst.args.partition("=")
        scope = dockerfile.args.setdefault(inst.stage, {})
        if default:
            scope[name] = default.strip().strip('"')
            if inst.stage == -1:
                global_args[name] = scope[name]
        elif name in global_args:  # re-declared in a stage: takes the global default
            scope[name] = global_args[name]
    return dockerfile


def load(name: str) -> Dockerfile:
    return parse((DOCKER_DIR / name).read_text())


def _stage_aliases(df: Dockerfile) -> set[str]:
    aliases = set()
    for inst in df.instructions:
        if inst.keyword == "FROM":
            words = inst.args.split()
            if len(words) >= 3 and words[-2].upper() == "AS":
                aliases.add(words[-1].lower())
    return aliases


def _run_commands(args: str) -> list[str]:
    """The commands of a RUN, split at && / || / ; (a good enough shell split here)."""
    return [c.strip() for c in re.split(r"&&|\|\||;", args) if c.strip()]


def _copy_sources(inst: Instruction) -> list[str]:
    words = inst.exec_form() or inst.args.split()
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


# --- the rules ---------------------------------------------------------------------------------


def from_problems(df: Dockerfile) -> list[str]:
    problems = []
    aliases = _stage_aliases(df)
    for inst in df.instructions:
        if inst.keyword != "FROM":
            continue
        words = [w for w in inst.args.split() if not w.startswith("--platform")]
        ref = df.substitute(words[0], -1)
        if ref.lower() in aliases:
            continue
        if "$" in ref:
            problems.append(f"line {inst.line}: FROM {words[0]}: no ARG default to pin it")
            continue
        name, _, digest = ref.partition("@")
        last = name.rsplit("/", 1)[-1]
        tag = last.rsplit(":", 1)[1] if ":" in last else None
        if digest:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                problems.append(f"line {inst.line}: FROM {ref}: malformed digest")
        elif tag is None or tag == "latest" or not re.search(r"\d", tag):
            problems.append(f"line {inst.line}: FROM {ref}: not pinned to a version tag")
    return problems


def multistage_problems(df: Dockerfile) -> list[str]:
    if df.stage_count() < 2:
        return ["single stage: build in a builder stage, copy the venv into the runtime one"]
    copies = [i for i in df.final_stage() if i.keyword == "COPY" and "--from=" in i.args]
    if not any("/opt/venv" in i.args for i in copies):
        return ["the final stage does not COPY --from=<builder> the venv (/opt/venv)"]
    return []


def _is_root(user: str) -> bool:
    name = user.split(":")[0].strip()
    return name in ("", "root", "0")


def user_problems(df: Dockerfile) -> list[str]:
    final = df.final_stage()
    users = [(n, i) for n, i in enumerate(final) if i.keyword == "USER"]
    starts = [n for n, i in enumerate(final) if i.keyword in ("ENTRYPOINT", "CMD")]
    if not users:
        return ["the final stage has no USER: the container would run as root"]
    n, last = users[-1]
    user = df.substitute(last.args, last.stage)
    problems = []
    if _is_root(user) or "$" in user:
        problems.append(f"line {last.line}: USER {last.args} ({user}) is not a fixed non-root user")
    if starts and n > min(starts):
        problems.append(f"line {last.line}: USER comes after ENTRYPOINT / CMD")
    return problems


def healthcheck_problems(df: Dockerfile) -> list[str]:
    checks = [i for i in df.final_stage() if i.keyword == "HEALTHCHECK"]
    if not checks:
        return ["no HEALTHCHECK"]
    if checks[-1].args.strip().upper() == "NONE":
        return [f"line {checks[-1].line}: HEALTHCHECK NONE"]
    if "CMD" not in checks[-1].args:
        return [f"line {checks[-1].line}: HEALTHCHECK without CMD"]
    return []


def expose_problems(df: Dockerfile, ports: set[str]) -> list[str]:
    exposed = {
        p.split("/")[0] for i in df.final_stage() if i.keyword == "EXPOSE" for p in i.args.split()
    }
    missing = ports - exposed
    return [f"EXPOSE lacks {sorted(missing)}"] if missing else []


def entrypoint_problems(df: Dockerfile, script: str, pyproject: str) -> list[str]:
    entrypoints = [i for i in df.final_stage() if i.keyword == "ENTRYPOINT"]
    if not entrypoints:
        return ["no ENTRYPOINT"]
    form = entrypoints[-1].exec_form()
    if form is None:
        return [
            f"line {entrypoints[-1].line}: ENTRYPOINT in shell form (the process would not be "
            "PID 1 and would not get SIGTERM)"
        ]
    problems = []
    if form[0] != script:
        problems.append(f"ENTRYPOINT runs {form[0]!r}, not the console script {script!r}")
    scripts = tomllib.loads((REPO_ROOT / pyproject).read_text())["project"]["scripts"]
    if script not in scripts:
        problems.append(f"{pyproject} declares no console script {script!r}")
    return problems


def add_problems(df: Dockerfile) -> list[str]:
    return [
        f"line {i.line}: ADD of a URL ({source}): download in a RUN and verify a checksum"
        for i in df.instructions
        if i.keyword == "ADD"
        for source in _copy_sources(i)
        if re.match(r"(https?|ftp)://|git@", source)
    ]


def copy_source_problems(df: Dockerfile) -> list[str]:
    return [
        f"line {i.line}: COPY {source}: not in the build context"
        for i in df.instructions
        if i.keyword in ("COPY", "ADD") and "--from=" not in i.args
        for source in _copy_sources(i)
        if not re.match(r"(https?|ftp)://", source) and not list(REPO_ROOT.glob(source.rstrip("/")))
    ]


def pip_problems(df: Dockerfile) -> list[str]:
    return [
        f"line {i.line}: `{command[:60]}...` without --no-cache-dir"
        for i in df.instructions
        if i.keyword == "RUN"
        for command in _run_commands(i.args)
        if re.search(r"\bpip3? install\b", command) and "--no-cache-dir" not in command
    ]


def apt_problems(df: Dockerfile) -> list[str]:
    problems = []
    for i in df.instructions:
        if i.keyword != "RUN" or "apt-get install" not in i.args:
            continue
        if "apt-get update" not in i.args:
            problems.append(f"line {i.line}: apt-get install without apt-get update in the RUN")
        if "--no-install-recommends" not in i.args:
            problems.append(f"line {i.line}: apt-get install without --no-install-recommends")
        if not re.search(r"rm -rf /var/lib/apt/lists/\*?", i.args):
            problems.append(
                f"line {i.line}: apt lists not removed in the same RUN (they stay in the layer)"
            )
    return problems


def label_problems(df: Dockerfile) -> list[str]:
    labels = " ".join(i.args for i in df.final_stage() if i.keyword == "LABEL")
    return [
        f"no LABEL {key}"
        for key in (
            "org.opencontainers.image.title",
            "org.opencontainers.image.version",
            "org.opencontainers.image.revision",
        )
        if f"{key}=" not in labels
    ]


def _pinned_torch() -> str:
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line.strip().lower().startswith("torch=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError("constraints.txt does not pin torch")


def _torch_installs(df: Dockerfile) -> list[Instruction]:
    return [
        i
        for i in df.instructions
        if i.keyword == "RUN"
        and any(
            re.search(r"\bpip3? install\b", c)
            and re.search(r"\btorch\b", df.substitute(c, i.stage))
            for c in _run_commands(i.args)
        )
    ]


def torch_problems(df: Dockerfile, agent: bool) -> list[str]:
    installs = _torch_installs(df)
    if agent:
        problems = [f"line {i.line}: the agent image installs torch" for i in installs]
        problems += [
            f"line {i.line}: the agent image copies the policy server"
            for i in df.instructions
            if i.keyword == "COPY" and "policy_server" in i.args
        ]
        if not any("find_spec('torch')" in i.args for i in df.instructions if i.keyword == "RUN"):
            problems.append("the agent build does not check that torch is absent")
        return problems
    if not installs:
        return ["torch is not installed"]
    problems = []
    pinned = _pinned_torch()
    for i in installs:
        if "-c constraints.txt" not in i.args:
            problems.append(f"line {i.line}: torch installed without -c constraints.txt")
        versions = re.findall(r"torch==([0-9][^\"'\s]*)", df.substitute(i.args, i.stage))
        if not versions:
            problems.append(f"line {i.line}: torch installed without a pinned version")
        for version in versions:
            if version.split("+")[0] != pinned:
                problems.append(f"line {i.line}: torch {version}, constraints.txt pins {pinned}")
    return problems


def final_env(df: Dockerfile) -> dict[str, str]:
    """The final stage's ENV values (KEY=VALUE form; a later assignment wins)."""
    env: dict[str, str] = {}
    for inst in df.final_stage():
        if inst.keyword == "ENV":
            for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S*)', inst.args):
                env[key] = value.strip('"')
    return env


def bind_problems(df: Dockerfile, variable: str) -> list[str]:
    value = final_env(df).get(variable)
    if value != "0.0.0.0":
        return [f"{variable} is {value!r}, not 0.0.0.0: unreachable from other containers"]
    return []


def lint(name: str, df: Dockerfile) -> dict[str, list[str]]:
    script, pyproject, ports = IMAGES[name]
    return {
        "from": from_problems(df),
        "multistage": multistage_problems(df),
        "user": user_problems(df),
        "healthcheck": healthcheck_problems(df),
        "expose": expose_problems(df, ports),
        "entrypoint": entrypoint_problems(df, script, pyproject),
        "add": add_problems(df),
        "copy": copy_source_problems(df),
        "pip": pip_problems(df),
        "apt": apt_problems(df),
        "labels": label_problems(df),
        "torch": torch_problems(df, agent=name == AGENT),
        "bind": bind_problems(df, BIND_ALL[name]),
    }


REQUIRED_IGNORES = (".git", ".venv", "runs", "out", "**/__pycache__", ".pytest_cache")


def dockerignore_problems(text: str) -> list[str]:
    patterns = {
        line.strip().rstrip("/").removeprefix("/")
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    }
    problems = [
        f".dockerignore does not exclude {p}" for p in REQUIRED_IGNORES if p not in patterns
    ]
    problems += [f".dockerignore re-includes {p}" for p in patterns if p.startswith("!")]
    return problems


# --- the tests ----------------------------------------------------------------------------------


def test_the_three_images_are_there() -> None:
    assert sorted(p.name for p in DOCKER_DIR.glob("*.Dockerfile")) == sorted(IMAGES)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_follows_the_rules(name: str) -> None:
    problems = [f"{rule}: {p}" for rule, ps in lint(name, load(name)).items() for p in ps]
    assert not problems, "\n".join(problems)


def test_dockerignore_keeps_the_context_small() -> None:
    problems = dockerignore_problems(DOCKERIGNORE.read_text())
    assert not problems, "\n".join(problems)


def test_parser() -> None:
    df = parse(
        "# syntax=docker/dockerfile:1\nARG IMG=python:3.11-slim\nFROM ${IMG} AS build\n"
        "RUN a \\\n  # a comment inside\n  && b\nFROM ${IMG}\nARG IMG\nUSER 10:10\n"
        'CMD ["x", "y"]\n'
    )
    assert [(i.keyword, i.stage) for i in df.instructions] == [
        ("ARG", -1),
        ("FROM", 0),
        ("RUN", 0),
        ("FROM", 1),
        ("ARG", 1),
        ("USER", 1),
        ("CMD", 1),
    ]
    assert df.instructions[2].args == "a && b"
    assert df.substitute("${IMG}", 1) == "python:3.11-slim"
    assert df.instructions[-1].exec_form() == ["x", "y"]


# --- every rule catches a violation --------------------------------------------------------------


def _edit(old: str, new: str) -> Callable[[str], str]:
    def apply(text: str) -> str:
        assert old in text, f"mutation target not found: {old!r}"
        return text.replace(old, new, 1)

    return apply


def _drop_lines(prefix: str) -> Callable[[str], str]:
    def apply(text: str) -> str:
        lines = text.splitlines()
        kept = [line for line in lines if not line.startswith(prefix)]
        assert len(kept) < len(lines), f"no line starts with {prefix!r}"
        return "\n".join(kept) + "\n"

    return apply


#: name -> (Dockerfile, rule expected to object, mutation of its text).
MUTATIONS: dict[str, tuple[str, str, Callable[[str], str]]] = {
    "FROM latest": (
        "policy-server.Dockerfile",
        "from",
        _edit("ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm", "ARG PYTHON_IMAGE=python:latest"),
    ),
    "FROM without tag": (
        "wbc-agent.Dockerfile",
        "from",
        _edit("ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm", "ARG PYTHON_IMAGE=python"),
    ),
    "FROM with a floating tag": (
        "policy-server-gpu.Dockerfile",
        "from",
        _edit(
            "ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04", "ARG CUDA_IMAGE=nvidia/cuda:base"
        ),
    ),
    "single stage": (
        "wbc-agent.Dockerfile",
        "multistage",
        _edit("COPY --from=builder /opt/venv /opt/venv", "RUN python -m venv /opt/venv"),
    ),
    "no USER": ("policy-server.Dockerfile", "user", _drop_lines("USER ")),
    "USER root": (
        "wbc-agent.Dockerfile",
        "user",
        _edit("USER ${GR2_UID}:${GR2_UID}", "USER root"),
    ),
    "USER 0 via ARG": (
        "policy-server-gpu.Dockerfile",
        "user",
        _edit("ARG GR2_UID=10001", "ARG GR2_UID=0"),
    ),
    "USER after CMD": (
        "policy-server.Dockerfile",
        "user",
        lambda t: _drop_lines("USER ")(t) + "USER 10001:10001\n",
    ),
    "no HEALTHCHECK": (
        "wbc-agent.Dockerfile",
        "healthcheck",
        lambda t: re.sub(r"HEALTHCHECK [^\n]*\\\n[^\n]*\n", "", t),
    ),
    "HEALTHCHECK NONE": (
        "policy-server.Dockerfile",
        "healthcheck",
        lambda t: t + "HEALTHCHECK NONE\n",
    ),
    "port not exposed": (
        "policy-server.Dockerfile",
        "expose",
        _edit("EXPOSE 50051 8000", "EXPOSE 8000"),
    ),
    "ENTRYPOINT shell form": (
        "policy-server.Dockerfile",
        "entrypoint",
        _edit('ENTRYPOINT ["gr2-policy-server"]', "ENTRYPOINT gr2-policy-server serve"),
    ),
    "ENTRYPOINT another program": (
        "wbc-agent.Dockerfile",
        "entrypoint",
        _edit('ENTRYPOINT ["gr2-wbc-agent"]', 'ENTRYPOINT ["python", "-m", "gr2_wbc.cli"]'),
    ),
    "ADD a URL": (
        "wbc-agent.Dockerfile",
        "add",
        _edit("COPY constraints.txt ./", "ADD https://example.com/constraints.txt ./"),
    ),
    "COPY a missing source": (
        "policy-server.Dockerfile",
        "copy",
        _edit("COPY proto/ proto/", "COPY protos/ protos/"),
    ),
    "pip with a cache": (
        "wbc-agent.Dockerfile",
        "pip",
        _edit("RUN pip install --no-cache-dir -c", "RUN pip install -c"),
    ),
    "apt lists left in the layer": (
        "wbc-agent.Dockerfile",
        "apt",
        _edit(
            "libosmesa6 \\\n    && rm -rf /var/lib/apt/lists/*",
            "libosmesa6\nRUN rm -rf /var/lib/apt/lists/*",
        ),
    ),
    "apt install without update": (
        "policy-server-gpu.Dockerfile",
        "apt",
        _edit(
            "RUN apt-get update \\\n    && apt-get install -y --no-install-recommends python3 \\\n",
            "RUN apt-get install -y --no-install-recommends python3 \\\n",
        ),
    ),
    "apt recommends": (
        "wbc-agent.Dockerfile",
        "apt",
        _edit("apt-get install -y --no-install-recommends", "apt-get install -y"),
    ),
    "no OCI version label": (
        "policy-server.Dockerfile",
        "labels",
        _edit('org.opencontainers.image.version="${VERSION}"', 'maintainer="x"'),
    ),
    "agent installs torch": (
        "wbc-agent.Dockerfile",
        "torch",
        lambda t: t.replace(
            "COPY constraints.txt ./",
            "RUN pip install --no-cache-dir torch==2.13.0\nCOPY constraints.txt ./",
        ),
    ),
    "agent installs the policy server": (
        "wbc-agent.Dockerfile",
        "torch",
        _edit("COPY clients/ clients/", "COPY services/policy_server/ services/policy_server/"),
    ),
    "agent without the torch guard": (
        "wbc-agent.Dockerfile",
        "torch",
        lambda t: re.sub(r" \\\n    && python -c \"import importlib[^\n]*", "", t),
    ),
    "torch not the pinned version": (
        "policy-server.Dockerfile",
        "torch",
        _edit("ARG TORCH_VERSION=2.13.0+cpu", "ARG TORCH_VERSION=2.12.0+cpu"),
    ),
    "torch without constraints": (
        "policy-server-gpu.Dockerfile",
        "torch",
        _edit(
            'RUN pip install --no-cache-dir -c constraints.txt "torch==',
            'RUN pip install --no-cache-dir "torch==',
        ),
    ),
    "server bound to loopback": (
        "policy-server.Dockerfile",
        "bind",
        _edit("    GR2_HOST=0.0.0.0 \\\n", "    GR2_HOST=127.0.0.1 \\\n"),
    ),
    "agent metrics on loopback": (
        "wbc-agent.Dockerfile",
        "bind",
        _edit("    GR2_WBC_METRICS_HOST=0.0.0.0 \\\n", "    GR2_WBC_METRICS_HOST=127.0.0.1 \\\n"),
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_rule_catches_a_violation(mutation: str) -> None:
    name, rule, mutate = MUTATIONS[mutation]
    original = (DOCKER_DIR / name).read_text()
    assert not lint(name, parse(original))[rule]
    problems = lint(name, parse(mutate(original)))[rule]
    assert problems, f"rule {rule!r} missed: {mutation}"


@pytest.mark.parametrize("pattern", [".git", ".venv", "runs", "out", "**/__pycache__"])
def test_dockerignore_rule_catches_a_missing_pattern(pattern: str) -> None:
    text = "\n".join(
        line for line in DOCKERIGNORE.read_text().splitlines() if line.strip() != pattern
    )
    assert dockerignore_problems(text)


def test_dockerignore_rule_catches_a_reinclusion() -> None:
    assert dockerignore_problems(DOCKERIGNORE.read_text() + "\n!runs/keep\n")
