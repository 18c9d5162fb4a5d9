"""Real vs predicted next frames of a recorded episode, side by side, as a video.

Replays an agent recording (``observations.npz``, see :mod:`gr2_wbc.recording`) through the
model with its KV cache, step by step exactly as the server did, and after each step lets the
model imagine the next frame of every view (greedy). Each video frame shows, per view, the
real frame of step t+1 next to the one the model predicted from steps 0..t.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gr2_policy.model.policy import GR2Policy
from gr2_policy.model.sampling import GREEDY

UPSCALE = 3  # 64 px frames are tiny in a video player


@torch.no_grad()
def predict_next_frames(
    policy: GR2Policy, instruction: str, images: np.ndarray, states: np.ndarray
) -> np.ndarray:
    """images (T, V, H, W, 3) uint8 in ``policy.config.views`` order, states (T, 8) ->
    predicted frames (T-1, V, H, W, 3) uint8: entry t is the model's guess of step t+1."""
    cfg = policy.config
    n_steps, n_views = images.shape[:2]
    lang = policy.encode_instruction([instruction])
    tokens = policy.tokenize_images(torch.from_numpy(images))  # (T, V, N)
    state = torch.as_tensor(states, dtype=lang.dtype)
    cache = policy.new_cache(1)
    out = np.empty((max(n_steps - 1, 0), *images.shape[1:]), np.uint8)
    for t in range(n_steps - 1):
        policy.step(cache, lang, tokens[t][None], state[t][None], want_actions=False)
        ids = policy.generate_frames(cache, lang, 1, GREEDY)  # (1, 1, V*N)
        frames = policy.decode_frames(ids.view(n_views, cfg.tokens_per_view))
        out[t] = frames.cpu().numpy()
    return out


def side_by_side(real: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(T, V, H, W, 3) twice -> video frames (T, V*H*UPSCALE, 2*W*UPSCALE, 3): one row per
    view, real on the left, predicted on the right."""
    pair = np.concatenate([real, predicted], axis=3)  # (T, V, H, 2W, 3)
    t, v, h, w2, c = pair.shape
    frames = pair.reshape(t, v * h, w2, c)
    return frames.repeat(UPSCALE, axis=1).repeat(UPSCALE, axis=2)


def write_predicted_video(policy: GR2Policy, observations: Path, out: Path, fps: float) -> Path:
    """Read ``observations.npz``, predict, and write the side-by-side MP4 to ``out``."""
    import imageio.v2 as imageio

    with np.load(observations, allow_pickle=False) as data:
        views = policy.config.views
        missing = [v for v in views if f"image_{v}" not in data.files]
        if missing:
            raise ValueError(f"{observations} has no views {missing} (model views {views})")
        images = np.stack([data[f"image_{v}"] for v in views], axis=1)
        states, instruction = data["state"], str(data["instruction"])
    predicted = predict_next_frames(policy, instruction, images, states)
    frames = side_by_side(images[1:], predicted)
    with imageio.get_writer(out, fps=fps, codec="libx264", macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)
    return out
