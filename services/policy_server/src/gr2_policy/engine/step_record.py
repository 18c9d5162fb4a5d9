"""The compact per-step inputs kept in the episode store (DESIGN.md section 6).

Replaying an episode's last R = L(h-1)+1 records rebuilds its KV cache exactly, on any
replica (after an eviction, or when another replica's episode arrives). One record is a
fixed little-endian layout, not a pickle:

    magic b"GR2S" | version u16 | token count u16 | step i64 | tokens u16[count] | state f32[8]

~300 bytes for gr2-tiny (2 views x 64 tokens), ~1 KB for gr2-base.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from gr2_policy.errors import StoreError

MAGIC = b"GR2S"
VERSION = 1
_HEADER = struct.Struct("<4sHHq")
STATE_DIM = 8


class StepRecordError(StoreError):
    """A stored step record is malformed (truncated, wrong magic or version): the store
    returned something no engine wrote."""


@dataclass(frozen=True)
class StepRecord:
    """step: the episode step; tokens (V*N,) image token ids; state (8,) float32 raw."""

    step: int
    tokens: np.ndarray
    state: np.ndarray

    def to_bytes(self) -> bytes:
        tokens = np.asarray(self.tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFF):
            raise ValueError("token ids must fit in 16 bits")
        header = _HEADER.pack(MAGIC, VERSION, tokens.size, self.step)
        return (
            header + tokens.astype("<u2").tobytes() + np.asarray(self.state, dtype="<f4").tobytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> StepRecord:
        if len(data) < _HEADER.size:
            raise StepRecordError(f"step record of {len(data)} bytes is truncated")
        magic, version, count, step = _HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise StepRecordError(f"not a version-{VERSION} step record (magic {magic!r})")
        expected = _HEADER.size + 2 * count + 4 * STATE_DIM
        if len(data) != expected:
            raise StepRecordError(f"step record has {len(data)} bytes, expected {expected}")
        tokens = np.frombuffer(data, dtype="<u2", count=count, offset=_HEADER.size)
        state = np.frombuffer(data, dtype="<f4", count=STATE_DIM, offset=_HEADER.size + 2 * count)
        return cls(step=step, tokens=tokens.astype(np.int64), state=state.astype(np.float32))
