"""Drive one episode step by step with Act: start it, send an observation per step (a
shipped sample scene, or random images with --random), print each chunk's first waypoint,
end it.

    python examples/drive_episode.py --server localhost:50051 --steps 5

A real robot would send its camera images and measured tool pose each step and execute
(part of) each returned chunk before the next observation; here the "robot" just moves its
tool to the chunk's first waypoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from gr2_client import PolicyClient, chunk_from_proto, make_observation
from gr2_client.media import load_rgb

SAMPLES = (
    Path(__file__).resolve().parents[1] / "services/policy_server/src/gr2_policy/api/static/samples"
)


def sample_images(name: str) -> tuple[str, dict[str, np.ndarray]]:
    index = json.loads((SAMPLES / "samples.json").read_text())
    sample = next(s for s in index["samples"] if s["name"] == name)
    return sample["instruction"], {v: load_rgb(SAMPLES / p) for v, p in sample["views"].items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="localhost:50051", help="policy server HOST:PORT")
    parser.add_argument("--steps", type=int, default=5, help="observations to send")
    parser.add_argument("--sample", default="pick-1000001", help="shipped sample scene")
    parser.add_argument("--random", action="store_true", help="random images instead")
    args = parser.parse_args()

    instruction, scene = sample_images(args.sample)
    rng = np.random.default_rng(0)
    position = np.array([0.45, 0.0, 0.35])  # tool position [m], robot base frame
    quat = np.array([0.0, 1.0, 0.0, 0.0])  # tool orientation (w, x, y, z): pointing down
    gripper = 0.0
    try:
        with PolicyClient(args.server) as client:
            info = client.server_info()
            info.check_compatible(tuple(scene))  # same protocol major, our cameras suffice
            episode = client.start_episode(instruction, robot_id="example")
            print(f"episode {episode}: {instruction!r} on {info.model_name} {info.model_version}")
            for seq in range(args.steps):
                images = {
                    name: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                    if args.random
                    else scene[name]
                    for name, w, h in info.views
                }
                obs = make_observation(
                    episode, seq, images, position, quat, gripper, capture_time_s=time.time()
                )
                chunk = chunk_from_proto(client.act(obs))
                first = chunk.positions[0]
                print(
                    f"chunk {chunk.seq}: {len(chunk.positions)} waypoints, first at "
                    f"+{chunk.time_offsets_s[0]:.2f} s: xyz ({first[0]:+.3f}, {first[1]:+.3f}, "
                    f"{first[2]:+.3f}) m, gripper {chunk.grippers[0]:.2f}; server compute "
                    f"{chunk.compute_time_s * 1e3:.1f} ms"
                )
                position, quat, gripper = first, chunk.quats_wxyz[0], float(chunk.grippers[0])
            ended = client.end_episode(episode)
            print(f"ended episode {ended.episode_id} after {ended.steps} steps")
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
