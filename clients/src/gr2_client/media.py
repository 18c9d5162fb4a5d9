"""Images in and out of the client: read RGB files, tile views side by side, and write the
predicted frames as an animated GIF, a PNG strip or JSON (Pillow, no torch)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from gr2_client.convert import PredictedFrame

OUTPUT_SUFFIXES = (".gif", ".png", ".json")


def load_rgb(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; ``size=(width, height)`` resizes it (bilinear)."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if size is not None and rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def tile_views(images: dict[str, np.ndarray], order: Sequence[str] | None = None) -> np.ndarray:
    """The views of one frame side by side, left to right in ``order`` (default: dict order);
    views of different heights are padded at the bottom with black."""
    names = list(order) if order is not None else list(images)
    tiles = [images[name] for name in names]
    height = max(t.shape[0] for t in tiles)
    padded = [
        np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) if t.shape[0] < height else t
        for t in tiles
    ]
    return np.concatenate(padded, axis=1)


def _scaled(rgb: np.ndarray, scale: int) -> Image.Image:
    img = Image.fromarray(rgb)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


TIMELINE_PX = 2


def with_timeline(frame: np.ndarray, index: int, count: int) -> np.ndarray:
    """``frame`` with a TIMELINE_PX-high bar below it, filled (white on dark grey) to
    (index + 1) / count of its width: where the frame is in the clip."""
    height, width = TIMELINE_PX, frame.shape[1]
    bar = np.full((height, width, 3), 48, dtype=np.uint8)
    bar[:, : max(1, round(width * (index + 1) / count))] = 255
    return np.concatenate([frame, bar], axis=0)


def write_gif(
    frames: Sequence[np.ndarray],
    path: str | Path,
    *,
    scale: int = 1,
    frame_ms: int = 200,
    timeline: bool = True,
) -> Path:
    """An animated, looping GIF with one GIF frame per array (each (H, W, 3) uint8).

    With ``timeline`` (the default) each frame gets a TIMELINE_PX-high progress bar below
    it (so the GIF is H + 2 pixels high, times ``scale``). Besides showing where the clip
    is, it keeps identical consecutive frames apart: GIF writers merge those into one."""
    if not frames:
        raise ValueError("no frames to write")
    if timeline:
        frames = [with_timeline(f, i, len(frames)) for i, f in enumerate(frames)]
    images = [_scaled(f, scale) for f in frames]
    path = Path(path)
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=frame_ms,
        loop=0,
        disposal=1,
        optimize=False,
    )
    return path


def write_strip(frames: Sequence[np.ndarray], path: str | Path, *, scale: int = 1) -> Path:
    """One PNG with the frames stacked top to bottom (row i = frame i, views left to right)."""
    if not frames:
        raise ValueError("no frames to write")
    width = max(f.shape[1] for f in frames)
    rows = [np.pad(f, ((0, 0), (0, width - f.shape[1]), (0, 0))) for f in frames]
    path = Path(path)
    _scaled(np.concatenate(rows, axis=0), scale).save(path, format="PNG")
    return path


def _png_base64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def frames_to_json(frames: Sequence[PredictedFrame], **meta: object) -> dict[str, object]:
    """``{**meta, "frames": [{"frame_index", "views": {name: {"width", "height",
    "png_base64"}}}]}``."""
    return {
        **meta,
        "frames": [
            {
                "frame_index": f.frame_index,
                "views": {
                    name: {
                        "width": int(rgb.shape[1]),
                        "height": int(rgb.shape[0]),
                        "png_base64": _png_base64(rgb),
                    }
                    for name, rgb in f.images.items()
                },
            }
            for f in frames
        ],
    }


def write_frames(
    frames: Sequence[PredictedFrame],
    path: str | Path,
    *,
    order: Sequence[str] | None = None,
    scale: int = 1,
    frame_ms: int = 200,
    meta: dict[str, object] | None = None,
) -> Path:
    """Write predicted frames by the suffix of ``path``: .gif (animated, views side by side),
    .png (all frames stacked) or .json (base64 PNGs per view)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"unknown output type {path.suffix!r}: use {', '.join(OUTPUT_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        path.write_text(json.dumps(frames_to_json(frames, **(meta or {})), indent=1) + "\n")
        return path
    tiled = [tile_views(f.images, order) for f in frames]
    if suffix == ".gif":
        return write_gif(tiled, path, scale=scale, frame_ms=frame_ms)
    return write_strip(tiled, path, scale=scale)
