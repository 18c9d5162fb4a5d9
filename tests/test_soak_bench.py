"""The soak benchmark's 30-second version: 32 robots running 10-step episodes against one real
server (gr2-tiny, seeded random weights, CPU) end with zero errors, every episode started is
ended and none is left on the server, and the server's RSS grows less than 10 % after warmup.

It takes about a minute (server start included); it carries the e2e marker, so
`-m "not e2e"` (or `--deselect tests/test_soak_bench.py`) leaves it out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT, child_env

pytestmark = pytest.mark.e2e

ROBOTS = 32


def test_soak_30_seconds_32_robots(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [
        sys.executable,
        str(REPO_ROOT / "bench" / "soak.py"),
        *("--robots", str(ROBOTS), "--duration", "30", "--warmup", "10"),
        *("--episode-steps", "10", "--rss-interval", "2"),
        # one intra-op thread, as the other tests' servers: no OpenMP stalls on a busy machine
        *("--torch-threads", "1"),
        *("--out", str(out)),
    ]
    proc = subprocess.run(
        argv, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"soak failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result

    assert result["benchmark"] == "soak"
    assert result["robots"] == ROBOTS
    assert result["load"] == "closed loop"
    assert result["errors"] == 0, result["errors_by_kind"]
    assert result["errors_by_kind"] == {}
    assert result["server"]["alive_until_end"] is True

    # episodes turned over: every robot finished at least one full episode, all were ended
    assert result["full_episodes_per_robot_min"] >= 1
    assert result["episodes_started"] == result["episodes_ended"] >= ROBOTS
    assert result["steps"] >= ROBOTS * 10
    assert result["server_after_end"]["gr2_policy_active_episodes"] == 0
    assert result["server_after_end"]["gr2_policy_kv_cache_usage_ratio"] == 0

    rss = result["rss"]
    for key in ("baseline_bytes", "end_bytes", "max_bytes", "after_episodes_ended_bytes"):
        assert rss[key] > 0, key
    assert rss["max_bytes"] >= max(rss["baseline_bytes"], rss["end_bytes"])
    assert len(rss["series"]) >= 10
    assert rss["growth"] == pytest.approx(rss["end_bytes"] / rss["baseline_bytes"] - 1, abs=1e-4)
    assert rss["growth"] < 0.10  # memory, not timing: the benchmark's own criterion

    assert all(v is True for v in result["checks"].values()), result["checks"]
    assert result["pass"] is True
