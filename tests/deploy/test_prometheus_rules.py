"""The Prometheus rules: promtool checks and unit-tests them, every alert has a test where it
fires and one where it does not, and the Kubernetes PrometheusRule is generated from them.

promtool comes with Debian's prometheus package (scripts/ensure_system_deps.sh, run by
`make test`); without it these tests fail rather than skip.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.deploy.promql import promtool
from tests.support.processes import REPO_ROOT

RULES_DIR = REPO_ROOT / "deploy" / "prometheus" / "rules"
TESTS_DIR = REPO_ROOT / "deploy" / "prometheus" / "tests"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
TEST_FILES = sorted(TESTS_DIR.glob("*.test.yml"))
SEVERITIES = {"critical", "warning", "info"}
#: What the issue asks alerts for; each must stay covered.
REQUIRED_ALERTS = {
    "GR2StepLatencyBudgetBurnFast",
    "GR2StepLatencyBudgetBurnSlow",
    "GR2WBCDeadlineMisses",
    "GR2WBCWatchdogTrips",
    "GR2PolicyStoreErrors",
    "GR2PolicyKVCachePoolExhausted",
}


def _promtool(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _alerts() -> dict[str, dict[str, Any]]:
    alerts = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["alert"] not in alerts, f"alert {rule['alert']} defined twice"
                    alerts[rule["alert"]] = rule
    return alerts


def test_promtool_check_rules() -> None:
    assert RULE_FILES
    proc = _promtool("check", "rules", *map(str, RULE_FILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass() -> None:
    assert TEST_FILES
    proc = _promtool("test", "rules", *map(str, TEST_FILES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test") or []:
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert REQUIRED_ALERTS - alerts == set(), "required alerts missing"
    assert alerts - fires == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"
    assert (fires | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_alerts_carry_severity_summary_description_and_runbook() -> None:
    for name, rule in _alerts().items():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{name} has no {key}"


def test_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The same unit tests against rules whose fast-burn threshold was raised must fail."""
    rules = tmp_path / "rules"
    tests = tmp_path / "tests"
    rules.mkdir()
    tests.mkdir()
    for path in RULE_FILES:
        text = path.read_text()
        (rules / path.name).write_text(text.replace("(14.4 * 0.01)", "(30 * 0.01)"))
    assert any("(30 * 0.01)" in p.read_text() for p in rules.iterdir())
    for path in TEST_FILES:
        shutil.copy(path, tests / path.name)
    proc = _promtool("test", "rules", *(p.name for p in TEST_FILES), cwd=tests)
    assert proc.returncode != 0
    assert "GR2StepLatencyBudgetBurnFast" in proc.stdout + proc.stderr


# ------------------------------------------------------------------ Kubernetes PrometheusRule


def _generator() -> ModuleType:
    path = REPO_ROOT / "scripts" / "gen_k8s_monitoring.py"
    spec = importlib.util.spec_from_file_location("gen_k8s_monitoring", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_k8s_prometheus_rule_is_the_generators_output() -> None:
    gen = _generator()
    assert gen.OUTPUT.read_text() == gen.render(), (
        "deploy/k8s/base/monitoring/prometheus-rule.yaml is stale: "
        "run `python scripts/gen_k8s_monitoring.py`"
    )


def test_k8s_prometheus_rule_holds_the_rule_files_groups() -> None:
    gen = _generator()
    rule = yaml.safe_load(gen.OUTPUT.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    groups = [g for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"]]
    assert rule["spec"]["groups"] == groups
