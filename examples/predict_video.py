"""Predict the next camera frames from a shipped sample scene and write them as a GIF.

    python examples/predict_video.py --server localhost:50051 --out prediction.gif

Uses the gr2_client SDK only (no torch): GetServerInfo for the served views, PredictVideo
for the frames (each arrives as soon as the server decodes it), gr2_client.media for the GIF.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
import numpy as np
from gr2_client import PolicyClient
from gr2_client.media import tile_views, write_gif
from PIL import Image

SAMPLES = (
    Path(__file__).resolve().parents[1] / "services/policy_server/src/gr2_policy/api/static/samples"
)


def load_sample(name: str) -> tuple[str, dict[str, np.ndarray]]:
    """(instruction, view name -> (H, W, 3) uint8) of a shipped sample scene."""
    index = json.loads((SAMPLES / "samples.json").read_text())
    sample = next((s for s in index["samples"] if s["name"] == name), None)
    if sample is None:
        names = [s["name"] for s in index["samples"]]
        raise SystemExit(f"no sample {name!r}; shipped samples: {names}")
    images = {
        view: np.asarray(Image.open(SAMPLES / rel).convert("RGB"), dtype=np.uint8)
        for view, rel in sample["views"].items()
    }
    return sample["instruction"], images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="localhost:50051", help="policy server HOST:PORT")
    parser.add_argument("--out", type=Path, default=Path("prediction.gif"), help="GIF to write")
    parser.add_argument("--sample", default="touch-1000000", help="shipped sample scene")
    parser.add_argument("--frames", type=int, default=4, help="frames to predict")
    args = parser.parse_args()

    instruction, images = load_sample(args.sample)
    try:
        with PolicyClient(args.server) as client:
            info = client.server_info()
            views = [name for name, _, _ in info.views]  # the order the server expects
            print(f"{info.model_name} {info.model_version}: views {views}")
            observation = {name: images[name] for name in views}
            tiles = []
            for frame in client.predict_video(instruction, observation, num_frames=args.frames):
                print(f"frame {frame.frame_index}: {[v.shape for v in frame.images.values()]}")
                tiles.append(tile_views(frame.images, views))  # views side by side
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # one GIF frame per predicted frame, with a 2-pixel timeline bar below the views
    write_gif(tiles, args.out, scale=2, frame_ms=200)
    with Image.open(args.out) as gif:
        print(f"wrote {args.out}: {gif.n_frames} frames of {gif.width}x{gif.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
