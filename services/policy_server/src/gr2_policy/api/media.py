"""Predicted video frames as media: GIF, MP4, a PNG contact strip, base64 PNGs.

A predicted frame is uint8 (V, H, W, 3), views in the served order. GIF and MP4 show each
frame's views side by side (left to right in view order); the PNG strip has one row per
frame and one column per view. Everything here is CPU work: call it off the event loop.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import GifImagePlugin, Image

FRAME_DURATION_MS = 250
"""How long each predicted frame shows in GIF and MP4 (4 frames per second)."""
MP4_UPSCALE = 4
"""MP4 frames are upscaled (nearest neighbour) so players show 64 px frames at a usable size
and the dimensions are even, as H.264 in yuv420p needs."""


def side_by_side(frame: np.ndarray) -> np.ndarray:
    """(V, H, W, 3) -> (H, V*W, 3): the views left to right."""
    return np.concatenate(list(frame), axis=1)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(rgb: np.ndarray) -> str:
    return base64.b64encode(png_bytes(rgb)).decode("ascii")


def png_strip(frames: Sequence[np.ndarray]) -> bytes:
    """One PNG: rows = predicted frames, columns = views."""
    return png_bytes(np.concatenate([side_by_side(f) for f in frames], axis=0))


def gif(frames: Sequence[np.ndarray], duration_ms: int = FRAME_DURATION_MS) -> bytes:
    """An endlessly looping animated GIF with exactly one GIF frame per predicted frame.

    Written frame by frame with PIL's GIF primitives because ``Image.save`` merges identical
    consecutive frames (a model that predicts no motion would give a one-frame GIF). All
    frames share one palette, quantized from all of them together.
    """
    strips = [side_by_side(f) for f in frames]
    palette = Image.fromarray(np.concatenate(strips, axis=0)).quantize(
        colors=256, dither=Image.Dither.NONE
    )
    images = [
        Image.fromarray(s).quantize(palette=palette, dither=Image.Dither.NONE) for s in strips
    ]
    header, _ = GifImagePlugin.getheader(images[0], info={"loop": 0})
    buf = io.BytesIO()
    buf.write(b"".join(header))
    for image in images:
        buf.write(b"".join(GifImagePlugin.getdata(image, duration=duration_ms)))
    buf.write(b";")  # trailer
    return buf.getvalue()


def mp4(frames: Sequence[np.ndarray], duration_ms: int = FRAME_DURATION_MS) -> bytes:
    """H.264 MP4 (yuv420p, faststart) via the ffmpeg binary that imageio-ffmpeg ships."""
    import imageio_ffmpeg

    strips = [
        np.ascontiguousarray(
            side_by_side(f).repeat(MP4_UPSCALE, axis=0).repeat(MP4_UPSCALE, axis=1)
        )
        for f in frames
    ]
    height, width = strips[0].shape[:2]
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="gr2-video-")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            path,
            (width, height),
            fps=1000.0 / duration_ms,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart"],
        )
        writer.send(None)  # start ffmpeg
        for strip in strips:
            writer.send(strip)
        writer.close()
        return Path(path).read_bytes()
    finally:
        Path(path).unlink()
