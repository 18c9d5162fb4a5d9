"""The answer to one step as bytes, kept in the episode store so that a retried seq gets the
same chunk again on whichever replica receives the retry (DESIGN.md sections 5 and 6).

Fixed layout, little-endian, not a pickle: magic ``GR2A``, version (u8), k (u16), then
float64 queue time, compute time and server time [s], then k rows of float64
``(time_offset_s, x, y, z, qw, qx, qy, qz, gripper)``. The predicted frame of a step that
asked for one is not kept: a replayed answer carries the waypoints only.
"""

from __future__ import annotations

import struct

import numpy as np

from gr2_policy.engine.interface import ActionChunk
from gr2_policy.errors import StoreError

MAGIC = b"GR2A"
VERSION = 1
_HEADER = struct.Struct("<4sBH3d")
_ROW = 9  # time offset, position (3), quaternion (4), gripper


def encode_reply(chunk: ActionChunk, server_time_s: float) -> bytes:
    """The chunk's waypoints and timings as bytes (its step record is not included)."""
    k = len(chunk.time_offsets_s)
    rows = np.empty((k, _ROW), dtype="<f8")
    rows[:, 0] = chunk.time_offsets_s
    rows[:, 1:4] = chunk.positions
    rows[:, 4:8] = chunk.quats_wxyz
    rows[:, 8] = chunk.grippers
    header = _HEADER.pack(
        MAGIC, VERSION, k, chunk.queue_time_s, chunk.compute_time_s, server_time_s
    )
    return header + rows.tobytes()


def decode_reply(data: bytes) -> tuple[ActionChunk, float]:
    """(chunk, server_time_s) from ``encode_reply`` bytes; StoreError when they are not."""
    if len(data) < _HEADER.size:
        raise StoreError(f"stored reply too short ({len(data)} bytes)")
    magic, version, k, queue_s, compute_s, server_s = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise StoreError(f"stored reply has magic {magic!r} version {version}, not {MAGIC!r} 1")
    expected = _HEADER.size + k * _ROW * 8
    if len(data) != expected:
        raise StoreError(f"stored reply of k={k} has {len(data)} bytes, expected {expected}")
    rows = np.frombuffer(data, dtype="<f8", offset=_HEADER.size).reshape(k, _ROW)
    chunk = ActionChunk(
        time_offsets_s=rows[:, 0].copy(),
        positions=rows[:, 1:4].copy(),
        quats_wxyz=rows[:, 4:8].copy(),
        grippers=rows[:, 8].copy(),
        queue_time_s=queue_s,
        compute_time_s=compute_s,
    )
    return chunk, server_s
