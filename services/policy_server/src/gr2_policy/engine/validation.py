"""Defensive checks of a ``StepInput`` inside the engine (the API layer validates first)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gr2_policy.engine.interface import MAX_VIDEO_FRAMES, StepInput, VideoRequest
from gr2_policy.errors import InvalidInputError
from gr2_policy.model.config import GR2Config

MIN_TEMPERATURE = 1e-3
"""The smallest sampling temperature accepted: float32 logits divided by a much smaller one
overflow to infinity and the softmax turns into NaN (0.001 is as good as greedy anyway)."""
MAX_TEMPERATURE = 1e3
"""The largest sampling temperature accepted (beyond it sampling is uniform)."""


def check_step_input(views: Sequence[str], size: int, step: StepInput) -> None:
    """Every view present as (size, size, 3) uint8, nothing extra; state finite; the
    quaternion non-zero. Raises InvalidInputError with what was wrong."""
    check_images(views, size, step.images)
    check_state(step.ee_position, step.ee_quat_wxyz, step.gripper)


def check_images(views: Sequence[str], size: int, images: dict[str, np.ndarray]) -> None:
    """Every view present as (size, size, 3) uint8, nothing extra."""
    extra = sorted(set(images) - set(views))
    if extra:
        raise InvalidInputError(f"unknown view(s) {extra}; expected {list(views)}")
    for view in views:
        image = images.get(view)
        if image is None:
            raise InvalidInputError(f"missing image for view {view!r}")
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise InvalidInputError(
                f"image for view {view!r} has shape {image.shape} dtype {image.dtype}, "
                f"expected ({size}, {size}, 3) uint8"
            )


def check_state(ee_position: np.ndarray, ee_quat_wxyz: np.ndarray, gripper: float) -> None:
    """Finite position (3,) and quaternion (4,), non-zero quaternion, finite gripper."""
    for name, value, length in (
        ("ee_position", ee_position, 3),
        ("ee_quat_wxyz", ee_quat_wxyz, 4),
    ):
        if np.shape(value) != (length,) or not np.all(np.isfinite(value)):
            raise InvalidInputError(f"{name} must be {length} finite numbers, got {value!r}")
    if not np.linalg.norm(ee_quat_wxyz) > 1e-6:
        raise InvalidInputError("ee_quat_wxyz must not be zero")
    if not np.isfinite(gripper):
        raise InvalidInputError(f"gripper must be finite, got {gripper!r}")


def check_video_request(cfg: GR2Config, request: VideoRequest) -> None:
    """Images as for a step, an optional valid state, 1..MAX_VIDEO_FRAMES frames, top_k in
    0..codebook size and a temperature in MIN_TEMPERATURE..MAX_TEMPERATURE."""
    check_images(cfg.views, cfg.image_size, request.images)
    state, sampling, num_frames = request.state, request.sampling, request.num_frames
    if state is not None:
        check_state(state.ee_position, state.ee_quat_wxyz, state.gripper)
    if not 1 <= num_frames <= MAX_VIDEO_FRAMES:
        raise InvalidInputError(f"num_frames must be in 1..{MAX_VIDEO_FRAMES}, got {num_frames}")
    if not 0 <= sampling.top_k <= cfg.codebook_size:
        raise InvalidInputError(f"top_k must be in 0..{cfg.codebook_size}, got {sampling.top_k}")
    check_temperature(sampling.temperature)


def check_temperature(temperature: float) -> None:
    """A finite temperature in MIN_TEMPERATURE..MAX_TEMPERATURE."""
    if not (math.isfinite(temperature) and MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise InvalidInputError(
            f"temperature must be in {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}, got {temperature}"
        )
