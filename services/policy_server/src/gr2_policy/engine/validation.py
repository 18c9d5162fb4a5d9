"""Defensive checks of a ``StepInput`` inside the engine (the API layer validates first)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gr2_policy.engine.interface import StepInput
from gr2_policy.errors import InvalidInputError


def check_step_input(views: Sequence[str], size: int, step: StepInput) -> None:
    """Every view present as (size, size, 3) uint8, nothing extra; state finite; the
    quaternion non-zero. Raises InvalidInputError with what was wrong."""
    extra = sorted(set(step.images) - set(views))
    if extra:
        raise InvalidInputError(f"unknown view(s) {extra}; expected {list(views)}")
    for view in views:
        image = step.images.get(view)
        if image is None:
            raise InvalidInputError(f"missing image for view {view!r}")
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise InvalidInputError(
                f"image for view {view!r} has shape {image.shape} dtype {image.dtype}, "
                f"expected ({size}, {size}, 3) uint8"
            )
    for name, value, length in (
        ("ee_position", step.ee_position, 3),
        ("ee_quat_wxyz", step.ee_quat_wxyz, 4),
    ):
        if np.shape(value) != (length,) or not np.all(np.isfinite(value)):
            raise InvalidInputError(f"{name} must be {length} finite numbers, got {value!r}")
    if not np.linalg.norm(step.ee_quat_wxyz) > 1e-6:
        raise InvalidInputError("ee_quat_wxyz must not be zero")
    if not np.isfinite(step.gripper):
        raise InvalidInputError(f"gripper must be finite, got {step.gripper!r}")
