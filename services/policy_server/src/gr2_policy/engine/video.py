"""Video prediction from one observation, shared by the engines: prefill, then tokens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from gr2_policy.engine.interface import VideoRequest, VideoSampling
from gr2_policy.model.policy import GR2Policy
from gr2_policy.model.sampling import Sampling


def model_sampling(sampling: VideoSampling) -> Sampling:
    """The model's Sampling for the engine's (ValueError for a bad top_k or temperature)."""
    return Sampling(
        greedy=sampling.greedy,
        top_k=sampling.top_k,
        temperature=sampling.temperature,
        seed=sampling.seed,
    )


def start_video(
    model: GR2Policy,
    views: Sequence[str],
    request: VideoRequest,
) -> Iterator[Tensor | None]:
    """Run the observation as the first step of a fresh one-episode cache (with the "no
    state" token when ``request.state`` is None) and return ``GR2Policy.iter_video`` over it: one
    ``next()`` per generated token, the frame's ids (1, V, N) after its last. Call under
    ``torch.inference_mode()`` on the model's thread."""
    device = model.gpt.image_in.weight.device
    images, state = request.images, request.state
    pixels = torch.from_numpy(np.stack([images[view] for view in views])[None]).to(device)
    tokens = model.tokenize_images(pixels)
    lang = model.encode_instruction([request.instruction])
    raw_state = None
    if state is not None:
        values = np.concatenate((state.ee_position, state.ee_quat_wxyz, [state.gripper]))
        raw_state = torch.as_tensor(values, dtype=torch.float32, device=device)[None]
    cache = model.new_cache(1)
    model.step(cache, lang, tokens, raw_state, want_actions=False)
    return model.iter_video(cache, lang, request.num_frames, model_sampling(request.sampling))
