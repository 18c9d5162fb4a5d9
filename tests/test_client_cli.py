"""The `gr2` CLI against a real policy server process (random weights): predict-video writes
GIF/PNG/JSON with the requested frames, bad input fails with a clear one-line message and no
traceback, info/bench print JSON, run-episode drives the simulated Gen3 through the agent."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.support.processes import REPO_ROOT, child_env, free_port, script_path
from tests.support.servers import PolicyServer, run_policy_server

SAMPLE = REPO_ROOT / "services/policy_server/src/gr2_policy/api/static/samples/touch-1000000"
VIEWS = [str(SAMPLE / "head.png"), str(SAMPLE / "wrist.png")]
TIMELINE_PX = 2  # gr2_client.media.TIMELINE_PX: the GIF's progress bar under the views


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    with run_policy_server(
        tmp_path_factory.mktemp("gr2-cli"), extra_args=("--random-weights",)
    ) as srv:
        yield srv


def gr2(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script_path("gr2"), *args], capture_output=True, text=True, timeout=timeout,
        env=child_env(),
    )  # fmt: skip


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode in (1, 2), result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_help_of_every_command() -> None:
    top = gr2("--help")
    assert top.returncode == 0, top.stderr
    for command in ("info", "predict-video", "run-episode", "bench"):
        assert command in top.stdout
        sub = gr2(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert f"gr2 {command}" in sub.stdout and "--server" not in sub.stderr
    assert "--instruction" in gr2("predict-video", "--help").stdout
    assert gr2().returncode == 2  # no command: usage error


def test_info_json(server: PolicyServer) -> None:
    result = gr2("--server", server.grpc_target, "info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert [v[0] for v in info["views"]] == ["head", "wrist"]
    assert info["protocol_version"].startswith("1.")


def test_predict_video_writes_a_gif_with_the_requested_frames(
    server: PolicyServer, tmp_path: Path
) -> None:
    out = tmp_path / "pred.gif"
    result = gr2(
        "--server", server.grpc_target, "predict-video", *VIEWS,
        "--instruction", "touch the red block", "--frames", "3", "-o", str(out), "--scale", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "3 frames" in result.stdout
    assert result.stderr.count("frame ") >= 3  # progress per frame (plain lines, not a TTY)
    with Image.open(out) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 3
        assert gif.size == (2 * 2 * 64, 2 * (64 + TIMELINE_PX))  # head | wrist, scaled 2x


def test_predict_video_png_strip_and_json(server: PolicyServer, tmp_path: Path) -> None:
    png = tmp_path / "pred.png"
    result = gr2(
        "--server", server.grpc_target, "predict-video", *VIEWS, "--instruction", "touch",
        "--frames", "2", "-o", str(png), "--sampling", "top_k", "--top-k", "8", "--seed", "1",
        "--state", "0.45,0,0.35,0,1,0,0,0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(png) as strip:
        assert strip.format == "PNG" and strip.size == (128, 128)  # 2 frames stacked

    js = tmp_path / "pred.json"
    result = gr2(
        "--server", server.grpc_target, "--no-progress", "predict-video", *VIEWS,
        "--instruction", "touch", "--frames", "2", "-o", str(js),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(js.read_text())
    assert [f["frame_index"] for f in data["frames"]] == [0, 1]
    assert set(data["frames"][0]["views"]) == {"head", "wrist"}


def test_predict_video_wrong_number_of_images(server: PolicyServer, tmp_path: Path) -> None:
    result = gr2(
        "--server", server.grpc_target, "predict-video", VIEWS[0], "--instruction", "touch",
        "-o", str(tmp_path / "x.gif"),
    )  # fmt: skip
    assert_clean_failure(result, "got 1 image(s)", "head (64x64), wrist (64x64)")
    assert not (tmp_path / "x.gif").exists()


def test_predict_video_wrong_image_size(server: PolicyServer, tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 48)).save(small)
    args = ("--server", server.grpc_target, "predict-video", VIEWS[0], str(small))
    result = gr2(*args, "--instruction", "touch", "-o", str(tmp_path / "x.gif"))
    assert_clean_failure(result, "'wrist'", "is 32x48", "expects 64x64")
    resized = gr2(*args, "--instruction", "touch", "--resize", "-o", str(tmp_path / "y.gif"))
    assert resized.returncode == 0, resized.stderr


def test_predict_video_server_rejection_is_one_line(server: PolicyServer, tmp_path: Path) -> None:
    result = gr2(
        "--server", server.grpc_target, "predict-video", *VIEWS, "--instruction", "touch",
        "--frames", "1000", "-o", str(tmp_path / "x.gif"),
    )  # fmt: skip
    assert result.returncode == 1
    assert_clean_failure(result, "INVALID_ARGUMENT")
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_server_exits_1() -> None:
    result = gr2("--server", f"127.0.0.1:{free_port()}", "bench", "--steps", "1")
    assert result.returncode == 1
    assert_clean_failure(result, "UNAVAILABLE")


def test_bench_json(server: PolicyServer) -> None:
    result = gr2("--server", server.grpc_target, "bench", "--steps", "5", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for transport in ("act", "stream"):
        stats = report[transport]
        assert stats["count"] == 5
        assert 0 < stats["round_trip_p50_s"] <= stats["round_trip_p99_s"]
        assert stats["server_compute_p50_s"] > 0 and stats["server_queue_p50_s"] >= 0
    text = gr2("--server", server.grpc_target, "bench", "--steps", "2")
    assert text.returncode == 0 and "StreamActions" in text.stdout and "p99" in text.stdout


@pytest.mark.e2e
def test_run_episode_on_the_sim(server: PolicyServer, tmp_path: Path) -> None:
    out = tmp_path / "episode"
    result = gr2(
        "--server", server.grpc_target, "run-episode", "--instruction", "touch the red block",
        "--max-seconds", "3", "--out", str(out), timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "chunk round trip" in result.stdout and "steps" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"] is None and summary["steps"] > 0
    assert (out / "episode.mp4").stat().st_size > 0


def test_run_episode_without_a_server_fails_cleanly() -> None:
    result = gr2(
        "--server", f"127.0.0.1:{free_port()}", "run-episode", "--instruction", "touch",
        "--max-seconds", "1",
    )  # fmt: skip
    assert result.returncode == 1
    assert_clean_failure(result, "cannot reach the policy server", "without an episode summary")
