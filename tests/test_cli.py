"""The command-line tools fail clearly (exit code + a message a user can act on, no
traceback) when the server is unreachable or a checkpoint is broken, and work when it is
there."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import child_env, free_port, script_path
from tests.support.servers import run_policy_server


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env=child_env()
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_gr2_info_without_a_server() -> None:
    """A gRPC failure is exit 1 (2 is kept for bad usage), one line, no traceback."""
    result = run(script_path("gr2"), "--server", f"127.0.0.1:{free_port()}", "info")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_without_a_server() -> None:
    result = run(
        script_path("gr2-wbc-agent"), "run", "--server", f"127.0.0.1:{free_port()}",
        "--instruction", "touch the red block", "--metrics-port", "0",
    )  # fmt: skip
    assert_clean_failure(result, "cannot reach the policy server")


def test_agent_refuses_a_backend_it_does_not_have() -> None:
    result = run(script_path("gr2-wbc-agent"), "run", "--robot", "kortex", "--instruction", "x")
    assert result.returncode != 0
    assert "--robot sim" in result.stderr and "Traceback" not in result.stderr


def test_serve_with_a_broken_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    result = run(
        script_path("gr2-policy-server"), "serve", "--checkpoint", str(tmp_path),
        "--grpc-port", str(free_port()), "--http-port", str(free_port()),
    )  # fmt: skip
    assert_clean_failure(result, "cannot load checkpoint")


def test_init_checkpoint_then_serve_and_describe(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    made = run(script_path("gr2-policy-server"), "init-checkpoint", "--out", str(out))
    assert made.returncode == 0, made.stderr
    version = json.loads(made.stdout)["model_version"]
    described = json.loads(
        run(script_path("gr2-policy-server"), "describe", "--checkpoint", str(out)).stdout
    )
    assert described["config"]["preset"] == "gr2-tiny"
    parts = described["parameters"]
    assert parts["total"] == sum(v for k, v in parts.items() if k not in ("total", "trainable"))
    with run_policy_server(tmp_path, extra_args=("--checkpoint", str(out))) as server:
        info = run(script_path("gr2"), "--server", server.grpc_target, "info", "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["model_version"] == version


def test_describe_a_preset_prints_config_and_parameter_counts() -> None:
    result = run(script_path("gr2-policy-server"), "describe", "--preset", "gr2-base")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["config"]["d_model"] == 768
    parts = described["parameters"]
    print(f"gr2-base: {parts}")
    assert 207e6 <= parts["total"] <= 253e6 and 85.5e6 <= parts["trainable"] <= 104.5e6
    assert parts["trainable"] == parts["gpt"] + parts["action_head"]


def test_clip_presets_need_a_clip_directory(tmp_path: Path) -> None:
    result = run(
        script_path("gr2-policy-server"), "init-checkpoint", "--preset", "gr2-base",
        "--out", str(tmp_path / "ckpt"),
    )  # fmt: skip
    assert_clean_failure(result, "pass --clip-dir")
    result = run(script_path("gr2-policy-server"), "describe", "--preset", "gr2-huge")
    assert_clean_failure(result, "unknown preset")


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port"])
def test_serve_rejects_an_invalid_port(flag: str) -> None:
    result = run(script_path("gr2-policy-server"), "serve", flag, "70000")
    assert_clean_failure(result, "invalid settings")
    assert "70000" in result.stderr


def test_agent_records_bounds_the_run_and_estops_on_sigusr1(tmp_path: Path) -> None:
    """--record DIR writes ticks.npz + cameras.mp4, --max-seconds ends the run with steps
    left (exit 0), and SIGUSR1 latches the e-stop for the rest of the run."""
    import signal
    import time

    import imageio.v3 as iio
    import numpy as np

    record = tmp_path / "rec"
    with run_policy_server(tmp_path, extra_args=("--torch-threads", "1")) as server:
        agent = subprocess.Popen(
            [
                script_path("gr2-wbc-agent"), "run", "--server", server.grpc_target,
                "--instruction", "pick up the red block", "--steps", "1000",
                "--metrics-port", "0", "--record", str(record), "--max-seconds", "3",
                "--video-fps", "10",
            ],
            stderr=subprocess.PIPE, text=True, env=child_env(),
        )  # fmt: skip
        assert agent.stderr is not None
        lines = []
        for line in agent.stderr:  # the handlers are installed before "running" is logged
            lines.append(line)
            if "first chunk" in line:  # it is tracking: stop it in the middle of that
                break
        time.sleep(0.3)
        agent.send_signal(signal.SIGUSR1)
        _, rest = agent.communicate(timeout=120)
    stderr = "".join(lines) + rest
    assert agent.returncode == 0, stderr
    assert "--max-seconds 3 reached" in stderr and "E-STOP latched (SIGUSR1)" in stderr

    summary = json.loads((record / "summary.json").read_text())
    assert 0 < summary["steps"] < 1000
    assert summary["safety"]["estop_latched"] and summary["safety"]["estop_reason"] == "SIGUSR1"
    # Real time: whatever this machine permits, the summary and the log say the same thing.
    rt = summary["realtime"]
    assert rt["requested_priority"] == 80 and f"real time: {rt['message']}" in stderr
    assert rt["message"].startswith(
        "SCHED_FIFO priority 80" if rt["scheduler"] == "SCHED_FIFO" else "SCHED_FIFO not permitted"
    )
    assert summary["clock"]["offset_s"] is not None and summary["clock"]["error_bound_s"] >= 0
    assert summary["trajectory"]["blend"] == "min_jerk"
    with np.load(record / "ticks.npz", allow_pickle=False) as data:
        from gr2_wbc.recording import KEYS

        assert set(data.files) == set(KEYS)
        t, state = data["t"], data["watchdog_state"]
        assert t.shape == (600,) and np.all(np.diff(t) > 0)  # 3 s at 200 Hz
        for key in ("q", "qd", "q_cmd", "qd_cmd", "ee_pos", "ee_quat_wxyz", "chunk_seq"):
            assert data[key].shape[0] == 600, key
        estop = np.flatnonzero(state == 3)
        assert estop.size and np.all(state[estop[0] :] == 3)  # latched to the end
        assert np.all(data["chunk_seq"][estop[0] :] == -1)
        assert (data["chunk_seq"][: estop[0]] >= 0).any()  # it tracked chunks before
        np.testing.assert_array_equal(data["qd_cmd"][-20:], 0.0)
    with np.load(record / "observations.npz", allow_pickle=False) as obs:
        n = summary["steps"]
        assert obs["time_s"].shape == (n,) and np.all(np.diff(obs["time_s"]) > 0)
        assert obs["image_head"].shape == obs["image_wrist"].shape == (n, 64, 64, 3)
        assert obs["state"].shape == (n, 8) and obs["q"].shape == (n, 7)
        assert str(obs["instruction"]) == "pick up the red block"
    frames = iio.imread(record / "cameras.mp4")
    assert frames.shape[0] >= 20 and frames.shape[3] == 3
