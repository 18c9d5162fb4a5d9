"""The wire contract: committed stubs match the .proto files, buf lint is clean, the
minimum surface of DESIGN.md section 5 exists, and both sides agree on the version."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gr2.v1 import policy_pb2 as pb

from tests.support.processes import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import gen_proto

COMMITTED = REPO_ROOT / "proto" / "gen" / "python"


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    fresh = gen_proto.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = COMMITTED / rel
        assert committed.exists(), f"{rel} is generated but not committed: run `make proto`"
        assert filecmp.cmp(path, committed, shallow=False), (
            f"{rel} differs from what protoc generates from proto/: run `make proto` "
            "(generated code is never edited by hand)"
        )
    extra = {p.relative_to(COMMITTED) for p in COMMITTED.rglob("*.py*")} - {
        p.relative_to(tmp_path) for p in fresh
    }
    assert not extra, f"committed stubs with no .proto behind them: {sorted(map(str, extra))}"


def test_buf_lint_clean() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        pytest.skip("buf not installed (make install adds buf-bin)")
    result = subprocess.run(
        [buf, "lint"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"buf lint:\n{result.stdout}{result.stderr}"


def test_minimum_surface() -> None:
    service = pb.DESCRIPTOR.services_by_name["PolicyService"]
    methods = {m.name: m for m in service.methods}
    expected = {
        "GetServerInfo": ("GetServerInfoRequest", "ServerInfo", False, False),
        "StartEpisode": ("StartEpisodeRequest", "StartEpisodeResponse", False, False),
        "StreamActions": ("Observation", "TrajectoryChunk", True, True),
        "Act": ("Observation", "TrajectoryChunk", False, False),
        "PredictVideo": ("PredictVideoRequest", "PredictedFrame", False, True),
        "EndEpisode": ("EndEpisodeRequest", "EndEpisodeResponse", False, False),
    }
    for name, (req, resp, client_stream, server_stream) in expected.items():
        m = methods[name]
        assert m.input_type.name == req and m.output_type.name == resp
        assert (m.client_streaming, m.server_streaming) == (client_stream, server_stream)
    fields = {
        "ServerInfo": {
            "model_name",
            "model_version",
            "preset",
            "views",
            "action_horizon",
            "waypoint_dt_s",
            "history",
            "protocol_version",
        },
        "Image": {"view", "encoding", "width", "height", "data"},
        "RobotState": {"ee_position", "ee_quat_wxyz", "gripper", "joint_positions"},
        "Observation": {"episode_id", "seq", "capture_time_s", "images", "state", "predict_video"},
        "Waypoint": {"time_offset_s", "position", "quat_wxyz", "gripper"},
        "TrajectoryChunk": {
            "episode_id",
            "seq",
            "waypoints",
            "model_version",
            "queue_time_s",
            "compute_time_s",
            "server_time_s",
        },
        "PredictVideoRequest": {"instruction", "images", "state", "num_frames", "sampling"},
        "PredictedFrame": {"frame_index", "images"},
        "StartEpisodeRequest": {"instruction", "robot_id", "idempotency_key"},
    }
    for message, names in fields.items():
        have = set(pb.DESCRIPTOR.message_types_by_name[message].fields_by_name)
        assert names <= have, f"{message} lacks {names - have}"


def test_client_and_server_agree_on_protocol_version() -> None:
    from gr2_client.options import PROTOCOL_VERSION as CLIENT_VERSION
    from gr2_policy.api.protocol import PROTOCOL_VERSION as SERVER_VERSION

    assert CLIENT_VERSION == SERVER_VERSION
