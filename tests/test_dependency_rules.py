"""Dependency direction (DESIGN.md section 2): the edge agent and the client never import
torch; the API layer never reaches into the model package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("tree", ["services/wbc_agent", "clients"])
def test_no_torch_import_in_source(tree: str) -> None:
    offenders = [
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / tree).rglob("*.py")
        if any(n == "torch" or n.startswith("torch.") for n in _imports(p))
    ]
    assert not offenders, f"torch imported under {tree}: {offenders}"


def test_agent_and_client_run_without_torch_loaded() -> None:
    """Importing every agent and client module must not pull torch in transitively."""
    code = (
        "import sys, pkgutil, importlib, gr2_wbc, gr2_client\n"
        "for pkg in (gr2_wbc, gr2_client):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_api_layer_does_not_import_the_model() -> None:
    api = REPO_ROOT / "services/policy_server/src/gr2_policy/api"
    offenders = [
        str(p.relative_to(REPO_ROOT))
        for p in api.rglob("*.py")
        if any(n.startswith(("gr2_policy.model", "torch")) for n in _imports(p))
    ]
    assert not offenders, f"api layer imports model internals or torch: {offenders}"


def test_model_knows_nothing_of_transport() -> None:
    model = REPO_ROOT / "services/policy_server/src/gr2_policy/model"
    banned = ("grpc", "redis", "fastapi", "gr2.v1", "gr2_policy.api", "gr2_policy.state")
    offenders = [
        str(p.relative_to(REPO_ROOT))
        for p in model.rglob("*.py")
        if any(n.startswith(banned) for n in _imports(p))
    ]
    assert not offenders, f"model package imports transport/state code: {offenders}"
