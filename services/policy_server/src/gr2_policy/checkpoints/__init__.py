"""Checkpoints shipped with the package.

``demo/``: gr2-tiny trained by this project's own pipeline on scripted sim demonstrations
(``training/recipes/demo_gr2_tiny.sh`` reproduces it; README "The demo model"). It is what
``gr2-policy-server serve`` serves when no checkpoint is given.
"""

from __future__ import annotations

from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo"


def bundled_demo_checkpoint() -> Path | None:
    """The bundled demo checkpoint's directory, or None if this install has none."""
    return DEMO_CHECKPOINT if (DEMO_CHECKPOINT / "config.json").is_file() else None
