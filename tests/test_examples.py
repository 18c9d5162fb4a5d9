"""The runnable examples of docs/client.md work against a real policy server process."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.support.processes import REPO_ROOT, child_env, free_port
from tests.support.servers import PolicyServer, run_policy_server

EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    with run_policy_server(
        tmp_path_factory.mktemp("examples"), extra_args=("--random-weights",)
    ) as srv:
        yield srv


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
        timeout=120, env=child_env(), cwd=REPO_ROOT,
    )  # fmt: skip


def test_predict_video_example_writes_the_gif(server: PolicyServer, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "prediction.gif"
    result = run_example(
        "predict_video.py", "--server", server.grpc_target, "--out", str(out), "--frames", "3"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [f"frame {i}:" in result.stdout for i in range(3)] == [True] * 3
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3
        assert gif.width == 2 * 2 * 64  # head | wrist, scale 2


@pytest.mark.parametrize("images", [(), ("--random",)], ids=["sample", "random"])
def test_drive_episode_example_prints_each_chunk(
    server: PolicyServer, images: tuple[str, ...]
) -> None:
    steps = 4
    result = run_example(
        "drive_episode.py", "--server", server.grpc_target, "--steps", str(steps), *images
    )
    assert result.returncode == 0, result.stdout + result.stderr
    chunks = re.findall(r"^chunk (\d+): 10 waypoints, first at \+", result.stdout, re.M)
    assert chunks == [str(i) for i in range(steps)], result.stdout
    assert f"after {steps} steps" in result.stdout


def test_the_quickstart_in_the_docs_runs(server: PolicyServer) -> None:
    """The Python block of docs/client.md's quickstart, against the test server."""
    doc = (REPO_ROOT / "docs" / "client.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(blocks) == 1, "docs/client.md should hold exactly the quickstart block"
    code = blocks[0].replace("localhost:50051", server.grpc_target)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env=child_env(), cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["0", "1", "2", "3"]


def test_examples_fail_cleanly_without_a_server() -> None:
    result = run_example("drive_episode.py", "--server", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr
