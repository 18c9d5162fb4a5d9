"""The Grafana dashboards pass the rules of grafana's dashboard-linter.

The linter is a Go program that neither PyPI nor npm carries, so its rules (lint/rule_*.go,
the default rule set) are implemented here, each reporting under the linter's rule name:

- template-datasource-rule: a ``datasource`` variable of type datasource, query prometheus.
- template-job-rule, template-instance-rule: ``job`` / ``instance`` query variables on
  ``${datasource}``, labelled Job / Instance, multi-select, allValue ``.+``.
- template-label-promql-rule: variable queries are label_values(...) & co over valid PromQL.
- template-on-time-change-reload: query variables refresh on time-range change (2).
- panel-datasource-rule: every panel and every target uses ``$datasource`` / ``${datasource}``.
- panel-title-description-rule: every panel has a title and a description.
- panel-units-rule: stat / table / timeseries / gauge panels set a valid unit.
- panel-no-targets-rule: those panels have targets.
- target-promql-rule: every expression parses (promtool: Prometheus' own parser).
- target-rate-interval-rule: rate / irate ranges are ``$__rate_interval``. Stricter than the
  linter: increase ranges are ``$__rate_interval`` or ``$__range`` (a total over the
  dashboard's time range), never a fixed window.
- target-job-rule, target-instance-rule: every selector has ``job=~"$job"`` and
  ``instance=~"$instance"``.
- target-counter-agg-rule: every counter (``_total``) is inside rate / irate / increase.

Plus ours: uids present, unique and stable (links and provisioning use them), schemaVersion
of a current Grafana, unique panel ids and target refIds. Every rule is shown to catch a
violation on a mutated copy of a dashboard.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.promql import expand_variables, promtool_check_exprs, selectors
from tests.support.processes import REPO_ROOT

DASHBOARD_DIR = REPO_ROOT / "deploy" / "grafana" / "dashboards"
#: File stem -> uid. Dashboard links, bookmarks and provisioning refer to these: keep them.
EXPECTED_UIDS = {
    "gr2-fleet": "gr2-fleet",
    "gr2-policy-server": "gr2-policy-server",
    "gr2-wbc-agent": "gr2-wbc-agent",
}
MIN_SCHEMA_VERSION = 39  # Grafana 10.4 / 11

#: Panel types the linter checks for units, titles and targets.
_VALUE_PANELS = frozenset({"stat", "singlestat", "graph", "table", "timeseries", "gauge"})
#: Panel types whose targets hold PromQL (the linter's panelHasQueries).
_QUERY_PANELS = frozenset(
    {"singlestat", "graph", "table", "stat", "state-timeline", "timeseries", "gauge"}
)
_DATASOURCE_REFS = frozenset({"$datasource", "${datasource}"})
#: The units of Grafana's value formats (packages/grafana-data/src/valueFormats/categories.ts)
#: that fit these dashboards' data; anything else is a typo or a unit Grafana does not know.
_VALID_UNITS = frozenset(
    {
        # misc
        "none", "string", "short", "percent", "percentunit", "sci", "locale",
        # time
        "hertz", "ns", "µs", "ms", "s", "m", "h", "d", "dtdurationms", "dtdurations", "dthms",
        "dtdhms", "timeticks", "clockms", "clocks",
        # throughput
        "cps", "ops", "reqps", "rps", "wps", "iops", "cpm", "opm", "rpm", "wpm",
        # data
        "bytes", "decbytes", "bits", "decbits", "kbytes", "deckbytes", "mbytes", "decmbytes",
        "gbytes", "decgbytes",
        # length, velocity, angle
        "lengthmm", "lengthm", "lengthkm", "velocityms", "degree", "radian",
        # boolean
        "bool", "bool_yes_no", "bool_on_off",
    }
)  # fmt: skip
_LABEL_FUNCTIONS = ("label_names", "label_values", "metrics", "query_result")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.stem: _load(p) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included (the linter's GetPanels)."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels") or [])

    yield from walk(dashboard.get("panels") or [])
    for row in dashboard.get("rows") or []:
        yield from walk(row.get("panels") or [])


def _ds_uid(ref: Any) -> str:
    return ref.get("uid", "") if isinstance(ref, dict) else (ref or "")


def _variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return (dashboard.get("templating") or {}).get("list") or []


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else query


def _label_query_expr(query: str) -> str | None:
    """The PromQL inside label_values(EXPR, label) & co; None for another function."""
    m = re.fullmatch(r"\s*([a-z_]+)\((.*)\)\s*", query, re.DOTALL)
    if m is None or m.group(1) not in _LABEL_FUNCTIONS:
        return None
    inner = m.group(2)
    if m.group(1) == "label_values" and "," in inner:
        inner = inner.rsplit(",", 1)[0]
    return inner


def _check_template(dashboard: dict[str, Any], name: str) -> list[str]:
    rule = f"template-{name}-rule"
    var = next((v for v in _variables(dashboard) if v.get("name") == name), None)
    if var is None:
        return [f"{rule}: missing the {name} variable"]
    problems = []
    if _ds_uid(var.get("datasource")) not in _DATASOURCE_REFS:
        problems.append(f"{rule}: {name} should use datasource $datasource")
    if var.get("type") != "query":
        problems.append(f"{rule}: {name} should be a query variable")
    if var.get("label") != name.title():
        problems.append(f"{rule}: {name} should be labelled {name.title()!r}")
    if not var.get("multi"):
        problems.append(f"{rule}: {name} should be multi-select")
    if var.get("allValue") != ".+":
        problems.append(f"{rule}: {name} allValue should be '.+'")
    return problems


def lint(dashboard: dict[str, Any]) -> list[str]:
    """Every rule's findings as ``rule-name: message`` (PromQL parsing aside: see
    :func:`promql_exprs`)."""
    problems: list[str] = []
    variables = _variables(dashboard)

    ds_vars = [v for v in variables if v.get("type") == "datasource"]
    if not any(
        v.get("query") == "prometheus" and v.get("name") in ("datasource", "prometheus_datasource")
        for v in ds_vars
    ):
        problems.append("template-datasource-rule: no prometheus datasource variable 'datasource'")
    for v in ds_vars:
        if v.get("label") not in ("Data source", "Prometheus data source"):
            problems.append(f"template-datasource-rule: label {v.get('label')!r}")

    problems += _check_template(dashboard, "job")
    problems += _check_template(dashboard, "instance")
    for v in variables:
        if v.get("type") != "query":
            continue
        if _label_query_expr(_variable_query(v)) is None:
            problems.append(f"template-label-promql-rule: {v.get('name')}: {_variable_query(v)!r}")
        if v.get("refresh") != 2:
            problems.append(
                f"template-on-time-change-reload: {v.get('name')} refresh is "
                f"{v.get('refresh')!r}, not 2 (on time range change)"
            )

    for panel in _panels(dashboard):
        kind, title = panel.get("type"), panel.get("title", "")
        if kind == "row":
            continue
        where = f"panel {title!r}"
        if not title or not panel.get("description"):
            problems.append(f"panel-title-description-rule: {where} (id {panel.get('id')})")
        targets = panel.get("targets") or []
        if kind in _VALUE_PANELS:
            unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit", "")
            if unit not in _VALID_UNITS:
                problems.append(f"panel-units-rule: {where} has unit {unit!r}")
            if not targets:
                problems.append(f"panel-no-targets-rule: {where}")
        if targets and _ds_uid(panel.get("datasource")) not in _DATASOURCE_REFS:
            problems.append(f"panel-datasource-rule: {where} uses {panel.get('datasource')!r}")
        for target in targets:
            if _ds_uid(target.get("datasource")) not in _DATASOURCE_REFS:
                problems.append(
                    f"panel-datasource-rule: {where} target {target.get('refId')} uses "
                    f"{target.get('datasource')!r}"
                )
            if kind in _QUERY_PANELS:
                problems += _lint_expr(where, target.get("expr", ""))
    return problems


def _lint_expr(where: str, expr: str) -> list[str]:
    if not expr.strip():
        return [f"target-promql-rule: {where} has an empty expression"]
    problems = []
    for sel in selectors(expr):
        if sel.range is not None and ":" not in sel.range:
            allowed = {
                "rate": {"$__rate_interval"},
                "irate": {"$__rate_interval"},
                "increase": {"$__rate_interval", "$__range"},
            }.get(sel.function or "")
            if allowed is not None and sel.range not in allowed:
                problems.append(
                    f"target-rate-interval-rule: {where}: {sel.function}({sel.name}[{sel.range}])"
                    f" should use {' or '.join(sorted(allowed))}"
                )
        for label in ("job", "instance"):
            if sel.matcher(label) != ("=~", f"${label}"):
                problems.append(
                    f'target-{label}-rule: {where}: {sel.name} lacks {label}=~"${label}"'
                )
        if sel.name.endswith("_total") and (
            sel.range is None or sel.function not in ("rate", "irate", "increase")
        ):
            problems.append(
                f"target-counter-agg-rule: {where}: counter {sel.name} is not in "
                "rate, irate or increase"
            )
    return problems


def promql_exprs(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL expression of the dashboard (targets and variable queries), with Grafana's
    variables expanded so that Prometheus' parser can read them."""
    exprs = {}
    for v in _variables(dashboard):
        if v.get("type") == "query":
            inner = _label_query_expr(_variable_query(v))
            if inner is not None:
                exprs[f"variable {v.get('name')}"] = expand_variables(inner)
    for panel in _panels(dashboard):
        if panel.get("type") not in _QUERY_PANELS:
            continue
        for target in panel.get("targets") or []:
            key = f"panel {panel.get('title')!r} target {target.get('refId')}"
            exprs[key] = expand_variables(target.get("expr", ""))
    return exprs


def check_structure(dashboards: dict[str, dict[str, Any]]) -> list[str]:
    """Our rules: uids, schema version, panel ids, target refIds."""
    problems = []
    uids: dict[str, str] = {}
    for stem, d in dashboards.items():
        uid = d.get("uid")
        if not uid:
            problems.append(f"uid-rule: {stem} has no uid")
        elif uid in uids:
            problems.append(f"uid-rule: {stem} repeats the uid of {uids[uid]}")
        else:
            uids[uid] = stem
        if not d.get("title"):
            problems.append(f"dashboard-rule: {stem} has no title")
        if int(d.get("schemaVersion", 0)) < MIN_SCHEMA_VERSION:
            problems.append(f"dashboard-rule: {stem} schemaVersion {d.get('schemaVersion')}")
        ids = [p.get("id") for p in _panels(d)]
        if None in ids or len(ids) != len(set(ids)):
            problems.append(f"dashboard-rule: {stem} panel ids missing or repeated")
        for p in _panels(d):
            refs = [t.get("refId") for t in p.get("targets") or []]
            if None in refs or len(refs) != len(set(refs)):
                problems.append(f"dashboard-rule: {stem} panel {p.get('title')!r} refIds")
    return problems


# ------------------------------------------------------------------ the dashboards pass


def test_the_three_dashboards_are_there_with_stable_uids() -> None:
    dashboards = _dashboards()
    assert {stem: d.get("uid") for stem, d in dashboards.items()} == EXPECTED_UIDS
    assert check_structure(dashboards) == []


@pytest.mark.parametrize("stem", sorted(EXPECTED_UIDS))
def test_dashboard_passes_the_linter_rules(stem: str) -> None:
    dashboard = _load(DASHBOARD_DIR / f"{stem}.json")
    assert lint(dashboard) == []
    # Enough panels that an emptied dashboard cannot pass.
    assert sum(1 for p in _panels(dashboard) if p.get("targets")) >= 10


def test_every_dashboard_expression_parses() -> None:
    """target-promql-rule and template-label-promql-rule, by Prometheus' parser."""
    exprs = {
        f"{stem}: {key}": expr
        for stem, d in _dashboards().items()
        for key, expr in promql_exprs(d).items()
    }
    assert len(exprs) >= 50
    assert promtool_check_exprs(exprs) == {}


# ------------------------------------------------------------------ each rule catches its violation


def _first_target(d: dict[str, Any], pred: Callable[[str], bool]) -> dict[str, Any]:
    for panel in _panels(d):
        for target in panel.get("targets") or []:
            if pred(target.get("expr", "")):
                return target
    raise AssertionError("no target matches")


def _first_panel(d: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in _panels(d) if p.get("type") == kind)


def _var(d: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in _variables(d) if v.get("name") == name)


def _drop_var(d: dict[str, Any], name: str) -> None:
    d["templating"]["list"] = [v for v in _variables(d) if v.get("name") != name]


def _set_expr(d: dict[str, Any], pred: Callable[[str], bool], fn: Callable[[str], str]) -> None:
    target = _first_target(d, pred)
    target["expr"] = fn(target["expr"])


MUTATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "no datasource variable": (
        "template-datasource-rule",
        lambda d: _drop_var(d, "datasource"),
    ),
    "job variable single-select": (
        "template-job-rule",
        lambda d: _var(d, "job").update(multi=False),
    ),
    "no instance variable": (
        "template-instance-rule",
        lambda d: _drop_var(d, "instance"),
    ),
    "variable query not a label function": (
        "template-label-promql-rule",
        lambda d: _var(d, "job").update(query="labels(job)"),
    ),
    "variable refreshed on load only": (
        "template-on-time-change-reload",
        lambda d: _var(d, "instance").update(refresh=1),
    ),
    "panel on a fixed data source": (
        "panel-datasource-rule",
        lambda d: _first_panel(d, "timeseries").update(
            datasource={"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
        ),
    ),
    "target on a fixed data source": (
        "panel-datasource-rule",
        lambda d: _first_target(d, bool).update(datasource={"uid": "prometheus"}),
    ),
    "panel without description": (
        "panel-title-description-rule",
        lambda d: _first_panel(d, "stat").update(description=""),
    ),
    "panel with an unknown unit": (
        "panel-units-rule",
        lambda d: _first_panel(d, "timeseries")["fieldConfig"]["defaults"].update(unit="furlongs"),
    ),
    "panel without unit": (
        "panel-units-rule",
        lambda d: _first_panel(d, "stat")["fieldConfig"]["defaults"].pop("unit"),
    ),
    "panel without targets": (
        "panel-no-targets-rule",
        lambda d: _first_panel(d, "timeseries").update(targets=[]),
    ),
    "rate over a fixed window": (
        "target-rate-interval-rule",
        lambda d: _set_expr(
            d, lambda e: "rate(" in e, lambda e: e.replace("$__rate_interval", "5m", 1)
        ),
    ),
    "increase over a fixed window": (
        "target-rate-interval-rule",
        lambda d: _first_target(d, bool).update(
            expr='sum(increase(gr2_x_total{job=~"$job", instance=~"$instance"}[1h]))'
        ),
    ),
    "selector without job matcher": (
        "target-job-rule",
        lambda d: _set_expr(d, bool, lambda e: e.replace('job=~"$job", ', "", 1)),
    ),
    "selector without instance matcher": (
        "target-instance-rule",
        lambda d: _set_expr(d, bool, lambda e: e.replace(', instance=~"$instance"', "", 1)),
    ),
    "counter without rate": (
        "target-counter-agg-rule",
        lambda d: _first_target(d, bool).update(
            expr='sum(gr2_x_total{job=~"$job", instance=~"$instance"})'
        ),
    ),
    "empty expression": (
        "target-promql-rule",
        lambda d: _first_target(d, bool).update(expr=" "),
    ),
}


@pytest.mark.parametrize("stem", sorted(EXPECTED_UIDS))
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_rule_catches_a_violation(stem: str, mutation: str) -> None:
    rule, mutate = MUTATIONS[mutation]
    dashboard = copy.deepcopy(_load(DASHBOARD_DIR / f"{stem}.json"))
    mutate(dashboard)
    assert any(p.startswith(rule + ":") for p in lint(dashboard)), lint(dashboard)


def test_promql_rule_catches_an_expression_that_does_not_parse() -> None:
    dashboard = copy.deepcopy(_load(DASHBOARD_DIR / "gr2-policy-server.json"))
    target = _first_target(dashboard, lambda e: "histogram_quantile" in e)
    target["expr"] = target["expr"][:-1]  # drop a closing parenthesis
    errors = promtool_check_exprs(promql_exprs(dashboard))
    assert len(errors) == 1
    assert "parse error" in next(iter(errors.values()))


def test_uid_rule_catches_a_repeated_or_missing_uid() -> None:
    dashboards = copy.deepcopy(_dashboards())
    dashboards["gr2-fleet"]["uid"] = dashboards["gr2-wbc-agent"]["uid"]
    assert any(p.startswith("uid-rule:") for p in check_structure(dashboards))
    dashboards["gr2-fleet"].pop("uid")
    assert any(p.startswith("uid-rule:") for p in check_structure(dashboards))
