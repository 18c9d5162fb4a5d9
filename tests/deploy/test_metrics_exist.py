"""Every metric a Grafana panel or an alert rule uses exists in a live /metrics (DESIGN.md
section 8).

The names come from the PromQL of every dashboard target and variable and every rule: the
vector selectors' metric names (not functions, keywords or label names). A name exists when
the exposition has a sample of it or declares its family (``# TYPE``): a labelled counter
with no children yet (store errors, auth failures) shows only its HELP and TYPE lines, and a
histogram family X provides X_bucket, X_sum and X_count. Names recorded by the rule files
exist by definition, and ``up`` is added by Prometheus to every target.

The live test runs a real policy server (random weights, a real redis-server so the store is
in play) and the WBC agent driving the simulated arm against it, and reads both /metrics
while the episode runs (the agent serves its metrics only while it runs); an offline test
checks the same names against the two metrics registries, without processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from gr2_policy.metrics import PolicyMetrics
from gr2_wbc.metrics import WBCMetrics
from prometheus_client import generate_latest

from tests.deploy.promql import metric_names
from tests.deploy.test_dashboards import DASHBOARD_DIR, promql_exprs
from tests.support.processes import (
    REPO_ROOT,
    RedisServer,
    child_env,
    free_port,
    script_path,
    stop_process,
)
from tests.support.servers import run_policy_server

RULE_FILES = sorted((REPO_ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
#: Series Prometheus itself adds to every scrape target.
SYNTHETIC = frozenset({"up"})
#: A floor on what the parser finds, so that a parse that finds nothing cannot pass.
MIN_NAMES = 25
#: The live run waits for the episode to be under way, at most this long (a bound against a
#: hang, not a performance check: the first steps of a CPU model can take seconds).
EPISODE_TIMEOUT_S = 240.0
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def referenced_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is used (dashboard file, rule file)."""
    used: dict[str, set[str]] = {}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        for expr in promql_exprs(json.loads(path.read_text())).values():
            for name in metric_names(expr):
                used.setdefault(name, set()).add(path.name)
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                for name in metric_names(rule["expr"]):
                    used.setdefault(name, set()).add(path.name)
    return used


def recorded_names() -> set[str]:
    return {
        rule["record"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def exposed_names(exposition: str) -> set[str]:
    """Every series name the text exposition has a sample of or declares a family for."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "summary":
                names |= {name + "_sum", name + "_count"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")  # OpenMetrics names the family without _total
        elif line and not line.startswith("#"):
            m = _NAME.match(line)
            if m:
                names.add(m.group())
    return names


def missing(exposed: set[str]) -> dict[str, list[str]]:
    defined = exposed | recorded_names() | SYNTHETIC
    return {
        name: sorted(where)
        for name, where in sorted(referenced_metrics().items())
        if name not in defined
    }


def test_the_parser_finds_the_metrics_dashboards_and_rules_use() -> None:
    used = referenced_metrics()
    assert len(used) >= MIN_NAMES, sorted(used)
    for name in (
        "gr2_policy_step_latency_seconds_bucket",
        "gr2_policy_requests_total",
        "gr2_wbc_deadline_misses_total",
        "gr2_wbc_watchdog_trips_total",
        "job:gr2_policy_steps_slow:ratio_rate1h",
    ):
        assert name in used, name
    # Functions, keywords and label names are not metric names.
    assert not used.keys() & {"rate", "sum", "histogram_quantile", "by", "le", "job", "instance"}


def test_the_metrics_registries_export_every_used_metric() -> None:
    """Offline: fresh registries of the server and the agent (no process needed)."""
    exposed = exposed_names(generate_latest(PolicyMetrics().registry).decode())
    exposed |= exposed_names(generate_latest(WBCMetrics().registry).decode())
    assert missing(exposed) == {}
    # A metric the exporters lost (or a typo in a panel) is reported, with where it is used.
    assert missing(exposed - {"gr2_wbc_watchdog_state"}) == {
        "gr2_wbc_watchdog_state": ["gr2-alerts.yml", "gr2-fleet.json", "gr2-wbc-agent.json"]
    }


def _sample(exposition: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", exposition, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _scrape(url: str) -> str:
    try:
        response = httpx.get(url, timeout=5.0)
    except httpx.HTTPError:
        return ""
    return response.text if response.status_code == 200 else ""


@pytest.mark.e2e
def test_live_metrics_cover_every_metric_dashboards_and_alerts_use(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with run_policy_server(
        tmp_path, redis_url=redis_server.url, extra_args=("--torch-threads", "1")
    ) as server:
        metrics_port = free_port()
        agent_log = tmp_path / "agent.log"
        with agent_log.open("wb") as log:
            # More steps than the test waits for: it stops the agent (SIGTERM ends the episode
            # cleanly) once both sides have reported. --max-seconds bounds an orphaned agent.
            agent = subprocess.Popen(
                [
                    script_path("gr2-wbc-agent"), "run", "--server", server.grpc_target,
                    "--robot", "sim", "--instruction", "pick up the red block",
                    "--steps", "1000", "--max-seconds", "300", "--robot-id", "metrics-test",
                    "--metrics-port", str(metrics_port),
                ],
                stdout=log, stderr=subprocess.STDOUT, env=child_env(),
            )  # fmt: skip
        agent_url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            deadline = time.monotonic() + EPISODE_TIMEOUT_S
            while True:
                if agent.poll() is not None:
                    pytest.fail(
                        f"agent exited with {agent.returncode}:\n{agent_log.read_text()}"
                        f"\nserver:\n{server.log_text()}"
                    )
                agent_text = _scrape(agent_url)
                server_text = _scrape(f"{server.http_url}/metrics")
                # Under way: the server answered steps, the agent's loop ticked and solved.
                if (
                    _sample(server_text, "gr2_policy_step_latency_seconds_count") >= 3
                    and _sample(agent_text, "gr2_wbc_loop_period_seconds_count") > 0
                    and _sample(agent_text, "gr2_wbc_qp_solve_seconds_count") > 0
                ):
                    break
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"no episode under way after {EPISODE_TIMEOUT_S:g} s:\n"
                        f"{agent_log.read_text()}\nserver:\n{server.log_text()}"
                    )
                time.sleep(0.5)
        finally:
            stop_process(agent, timeout_s=30.0)
        # After the episode ended (EndEpisode counted), the server's view once more.
        server_text = _scrape(f"{server.http_url}/metrics")

    assert 'method="StreamActions"' in server_text  # the agent's stream was served and counted
    exposed = exposed_names(server_text) | exposed_names(agent_text)
    assert missing(exposed) == {}
