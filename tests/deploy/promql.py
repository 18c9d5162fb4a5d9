"""What the deploy tests need to know about PromQL expressions, without a PromQL parser in
Python: their vector selectors (metric name, label matchers, range, the function applied to
the range), and Grafana's variables (expanded into values that parse).

Whether an expression parses is promtool's call (:func:`promtool_check_exprs`): it runs the
Prometheus parser itself. The lexer here only has to tell metric names apart from functions,
keywords and label names in expressions that do parse.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]+\}|\$[A-Za-z0-9_]+|\[\[[^\[\]]+\]\])
  | (?P<number>(?:\d+(?:ms|[smhdwy]))+|0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@:])
    """,
    re.VERBOSE,
)

#: Keywords whose parenthesised list holds label names, not expressions.
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
#: Identifiers that are neither metrics nor functions.
_KEYWORDS = (
    frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"})
    | _LABEL_LIST_KEYWORDS
)
#: Aggregation operators: their label list may come first, `sum by (le) (x)`.
_AGGREGATIONS = frozenset(
    {
        "sum", "avg", "count", "min", "max", "group", "stddev", "stdvar", "topk", "bottomk",
        "quantile", "count_values", "limitk", "limit_ratio",
    }
)  # fmt: skip


@dataclass
class Selector:
    """One vector selector: ``name{matchers}[range]`` inside ``function(...)``."""

    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)
    range: str | None = None  # the text between [ and ]; a subquery holds a ':'
    function: str | None = None  # the innermost call around it (None: no call, or a paren)

    def matcher(self, label: str) -> tuple[str, str] | None:
        for name, op, value in self.matchers:
            if name == label:
                return op, value
        return None


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) pairs, whitespace and comments dropped. Raises ValueError on a character
    no token starts with."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot lex PromQL at {expr[pos : pos + 20]!r} in {expr!r}")
        kind = m.lastgroup or ""
        if kind != "space":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    return bytes(text[1:-1], "utf-8").decode("unicode_escape")


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of ``expr`` in order of appearance."""
    toks = tokens(expr)
    found: list[Selector] = []
    # One entry per open '(': the function it calls, or "" for a grouping or label list.
    stack: list[str] = []
    label_list_next = False  # the next '(' opens a by/without/on/... label list
    pending_call: str | None = None  # an aggregation whose '(' comes after its label list
    in_label_list = 0
    i = 0

    def enclosing() -> str | None:
        return stack[-1] or None if stack else None

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "(":
            if label_list_next:
                stack.append("")
                in_label_list += 1
                label_list_next = False
            else:
                stack.append(pending_call or "")
                pending_call = None
            i += 1
            continue
        if text == ")":
            if stack:
                stack.pop()
            if in_label_list:
                in_label_list -= 1
            i += 1
            continue
        if text == "[":  # a subquery's or a stray range: skip to its ']'
            while i < len(toks) and toks[i][1] != "]":
                i += 1
            i += 1
            continue
        if kind == "ident":
            lower = text.lower()
            if in_label_list:
                i += 1
                continue
            if lower in _LABEL_LIST_KEYWORDS:
                label_list_next = nxt == "("  # group_left/group_right may have no list
                i += 1
                continue
            if lower in _KEYWORDS:
                i += 1
                continue
            if nxt == "(":
                pending_call = text
                i += 1
                continue
            if lower in _AGGREGATIONS and nxt.lower() in ("by", "without"):
                pending_call = text
                i += 1
                continue
            i = _read_selector(toks, i, text, enclosing(), found)
            continue
        if text == "{":  # a selector by matchers alone: {__name__="x"}
            i = _read_selector(toks, i - 1, "", enclosing(), found)
            continue
        i += 1
    return found


def _read_selector(
    toks: list[tuple[str, str]], i: int, name: str, function: str | None, out: list[Selector]
) -> int:
    """Read ``name{...}[...]`` starting at ``toks[i]`` (the name; for a nameless selector the
    token before '{'), append it, and return the index after it."""
    sel = Selector(name=name, function=function)
    i += 1
    if i < len(toks) and toks[i][1] == "{":
        i += 1
        while i < len(toks) and toks[i][1] != "}":
            if toks[i][1] == ",":
                i += 1
                continue
            label, op, value = toks[i][1], toks[i + 1][1], toks[i + 2][1]
            sel.matchers.append((label, op, _unquote(value)))
            i += 3
        i += 1
    if not sel.name:
        eq = sel.matcher("__name__")
        sel.name = eq[1] if eq and eq[0] == "=" else ""
    if i < len(toks) and toks[i][1] == "[":
        j = i + 1
        while j < len(toks) and toks[j][1] != "]":
            j += 1
        sel.range = "".join(t for _, t in toks[i + 1 : j])
        i = j + 1
    out.append(sel)
    return i


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` selects."""
    return {s.name for s in selectors(expr) if s.name}


# ------------------------------------------------------------------ Grafana variables

#: Values that parse where Grafana would put a variable's value: a duration for the time
#: variables, a word for the rest (inside quotes a variable stays as it is).
_TIME_VARIABLES = frozenset(
    {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_ms", "__range_s"}
)
_VARIABLE = re.compile(r"\$\{([^}:]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)|\[\[([^\[\]]+)\]\]")


def expand_variables(expr: str) -> str:
    """``expr`` with Grafana variables outside string literals replaced by placeholders, as
    dashboard-linter does before it parses a query."""
    out = []
    for kind, text in _raw_pieces(expr):
        if kind == "string":
            out.append(text)
            continue
        out.append(_VARIABLE.sub(_placeholder, text))
    return "".join(out)


def _placeholder(m: re.Match[str]) -> str:
    name = m.group(1) or m.group(2) or m.group(3)
    return "5m" if name in _TIME_VARIABLES else f"grafana_var_{name}"


def _raw_pieces(expr: str) -> Iterable[tuple[str, str]]:
    """Split ``expr`` into string literals and the text between them."""
    pos = 0
    for m in re.finditer(r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|`[^`]*`", expr):
        yield "code", expr[pos : m.start()]
        yield "string", m.group()
        pos = m.end()
    yield "code", expr[pos:]


# ------------------------------------------------------------------ promtool

PROMTOOL_MISSING = "promtool not found: run `make test` (scripts/ensure_system_deps.sh installs it)"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise AssertionError(PROMTOOL_MISSING)
    return path


def promtool_check_exprs(exprs: dict[str, str]) -> dict[str, str]:
    """Parse each expression with Prometheus' own parser (as recording rules in a throw-away
    rule file, through `promtool check rules`). Returns {key: error} for those that do not
    parse (one promtool run per failing expression, so each gets its own message)."""
    if _check_rules(list(exprs.values())) is None:
        return {}
    errors = {}
    for key, expr in exprs.items():
        error = _check_rules([expr])
        if error is not None:
            errors[key] = error
    return errors


def _check_rules(exprs: list[str]) -> str | None:
    rules = [{"record": f"lint:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exprs.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "lint", "rules": rules}]}))
        proc = subprocess.run(
            [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()
