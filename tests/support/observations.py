"""Seeded random observations for tests that talk to a real server."""

from __future__ import annotations

import numpy as np
from gr2.v1 import policy_pb2 as pb
from gr2_client import make_observation
from gr2_client.convert import ServerDescription


def random_observation(
    rng: np.random.Generator, info: ServerDescription, episode_id: str, seq: int
) -> pb.Observation:
    """Random images of the served views and sizes, a random pose, at 10 Hz capture times."""
    images = {
        name: rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for name, w, h in info.views
    }
    quat = rng.normal(size=4)
    return make_observation(
        episode_id,
        seq,
        images,
        rng.uniform(0.2, 0.6, size=3),
        quat / np.linalg.norm(quat),
        float(rng.uniform()),
        capture_time_s=0.1 * seq,
    )
