"""`gr2-eval` runs real agent processes against a real policy server and reports honestly."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.support.processes import child_env, script_path


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env=child_env()
    )


def random_checkpoint(out: Path) -> Path:
    """Random gr2-tiny weights written by the server's CLI (never succeeds early)."""
    init = run(
        script_path("gr2-policy-server"), "init-checkpoint", "--preset", "gr2-tiny",
        "--seed", "0", "--out", str(out),
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    return out


def test_eval_runs_episodes_through_server_and_agent(tmp_path: Path) -> None:
    checkpoint = random_checkpoint(tmp_path / "ck")
    out = tmp_path / "eval"
    result = run(
        script_path("gr2-eval"), "--task", "touch", "--episodes", "2", "--max-steps", "4",
        "--checkpoint", str(checkpoint), "--out", str(out), "--videos", "1", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    touch = results["touch"]
    assert touch["episodes"] == 2 and touch["errors"] == 0
    assert touch["mean_steps"] == 4.0  # random weights: it never succeeds early
    assert touch["round_trip_p50_ms"] > 0
    report = json.loads((out / "eval.json").read_text())
    seeds = sorted(r["seed"] for r in report["episodes"])
    assert seeds == [1_000_000, 1_000_001]  # held-out seeds
    for row in report["episodes"]:
        summary = json.loads((out / "episodes" / f"touch_{row['seed']}.json").read_text())
        assert summary["task"]["name"] == "touch" and summary["task"]["seed"] == row["seed"]
        assert summary["task"]["success"] == row["success"]
        assert summary["loop"]["lockstep_timeouts"] == 0
    assert (out / "videos" / "touch_1000000.mp4").stat().st_size > 0
    # Real vs predicted next frames: (steps - 1) frames, per view a row of real | predicted.
    import imageio.v3 as iio

    frames = iio.imread(out / "videos" / "touch_1000000_predicted.mp4")
    assert frames.shape[0] == 3 and frames.shape[1:] == (2 * 64 * 3, 2 * 64 * 3, 3)
    assert not (out / "videos" / "touch_1000001_predicted.mp4").exists()  # --videos 1
    assert "| touch | 2 |" in (out / "eval.md").read_text()


def test_eval_refuses_an_unknown_task_and_a_missing_checkpoint(tmp_path: Path) -> None:
    bad = run(script_path("gr2-eval"), "--task", "juggle", "--episodes", "1")
    assert bad.returncode == 2 and "unknown task" in bad.stderr
    missing = run(
        script_path("gr2-eval"), "--task", "touch", "--checkpoint", str(tmp_path / "none")
    )
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes that mention ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


def test_sigterm_stops_the_evaluation_and_every_process_it_started(tmp_path: Path) -> None:
    checkpoint = random_checkpoint(tmp_path / "ck")
    out = tmp_path / "eval"
    proc = subprocess.Popen(
        [script_path("gr2-eval"), "--task", "touch", "--episodes", "4", "--workers", "2",
         "--max-steps", "400", "--checkpoint", str(checkpoint), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        # Wait (no time assertion) until both agents are running episodes.
        while len(_processes_mentioning(f"--summary {out}")) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert _processes_mentioning(str(out)) == []  # no agent and no server outlived it
    assert _processes_mentioning(str(checkpoint)) == []
