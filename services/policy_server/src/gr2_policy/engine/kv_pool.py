"""The KV-cache pool: one preallocated slot per live episode, and the LRU table that assigns them.

Two parts, so the bookkeeping is testable without a model (as vLLM's cache manager):

- ``SlotTable``: plain CPU code. Episode id -> slot, least-recently-used order, pins (an
  episode whose step is queued or running cannot be evicted). ``allocate`` evicts the LRU
  idle episode when the table is full and returns None when every slot is pinned.
- ``KVCachePool``: the tensors. Keys/values (L, slots + 1, H, h*P, Dh) allocated once, plus
  what each key slot holds (step, position). Row ``slots`` is a scratch row that padded
  batch items read and write, so no live episode is touched by padding.

Sizing: ``bytes_per_episode`` is the cache of one episode; ``slots_for_budget`` how many fit
in a byte budget (``GR2_KV_POOL_BYTES``, or a fraction of free GPU memory).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from gr2_policy.model.config import GR2Config
from gr2_policy.model.kv_cache import EMPTY_STEP
from gr2_policy.model.step_function import step_key_positions, step_write_index

CACHE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.float8_e4m3fn,
}


# -- bookkeeping (no tensors) ---------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """A slot handed to an episode, and the episode evicted to free it (if any)."""

    slot: int
    evicted: str | None


class SlotTable:
    """Which episode holds which slot, in least-recently-used order."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a pool needs at least one slot, got {capacity}")
        self.capacity = capacity
        self._slots: OrderedDict[str, int] = OrderedDict()  # LRU first
        self._free = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
        self._pins: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, episode_id: object) -> bool:
        return episode_id in self._slots

    @property
    def usage(self) -> float:
        """Fraction of slots held, 0..1."""
        return len(self._slots) / self.capacity

    def slot_of(self, episode_id: str) -> int | None:
        return self._slots.get(episode_id)

    def allocate(self, episode_id: str) -> Allocation | None:
        """A slot for a new (or returning) episode, most recently used. When the table is
        full the least recently used unpinned episode is evicted; None when all are pinned.
        An episode that already holds a slot keeps it."""
        slot = self._slots.get(episode_id)
        if slot is not None:
            self.touch(episode_id)
            return Allocation(slot, None)
        evicted = None
        if not self._free:
            evicted = next((e for e in self._slots if self._pins.get(e, 0) == 0), None)
            if evicted is None:
                return None
            self._free.append(self._slots.pop(evicted))
        slot = self._free.pop()
        self._slots[episode_id] = slot
        return Allocation(slot, evicted)

    def touch(self, episode_id: str) -> None:
        """Mark as most recently used."""
        self._slots.move_to_end(episode_id)

    def pin(self, episode_id: str) -> None:
        """Protect from eviction (a step is queued or running); pins nest."""
        if episode_id not in self._slots:
            raise KeyError(episode_id)
        self._pins[episode_id] = self._pins.get(episode_id, 0) + 1

    def unpin(self, episode_id: str) -> None:
        count = self._pins.get(episode_id, 0) - 1
        if count > 0:
            self._pins[episode_id] = count
        else:
            self._pins.pop(episode_id, None)

    def free(self, episode_id: str) -> int | None:
        """Give the episode's slot back; returns it (None when it held none)."""
        slot = self._slots.pop(episode_id, None)
        self._pins.pop(episode_id, None)
        if slot is not None:
            self._free.append(slot)
        return slot


# -- tensors --------------------------------------------------------------------------------


def bytes_per_episode(cfg: GR2Config, dtype: torch.dtype = torch.float32) -> int:
    """KV bytes of one episode: 2 (k, v) x L x h*P x d_model elements, plus the per-key
    step and position bookkeeping (2 x int64 per key slot)."""
    keys = cfg.history * cfg.tokens_per_step
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * keys * cfg.d_model * element + 2 * keys * 8


def slots_for_budget(cfg: GR2Config, budget_bytes: int, dtype: torch.dtype) -> int:
    """How many episodes fit in ``budget_bytes`` (the scratch row is counted too)."""
    return max(0, budget_bytes // bytes_per_episode(cfg, dtype) - 1)


class KVCachePool:
    """Preallocated keys/values of ``slots`` episodes (+ one scratch row), one device."""

    def __init__(
        self,
        cfg: GR2Config,
        slots: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if slots < 1:
            raise ValueError(f"a pool needs at least one slot, got {slots}")
        self.cfg = cfg
        self.slots = slots
        self.scratch = slots  # the padding row
        self.dtype = dtype
        keys = cfg.history * cfg.tokens_per_step
        head_dim = cfg.d_model // cfg.n_heads
        shape = (cfg.n_layers, slots + 1, cfg.n_heads, keys, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_step = torch.full((slots + 1, keys), EMPTY_STEP, device=device)
        self.key_pos = torch.zeros((slots + 1, keys), dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.key_step.nbytes + self.key_pos.nbytes

    def reset(self, slot: int) -> None:
        """Empty a slot for a new episode (only the bookkeeping: stale keys are masked)."""
        self.key_step[slot].fill_(EMPTY_STEP)
        self.key_pos[slot].zero_()

    def gather(
        self, rows: Tensor, dtype: torch.dtype, out: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """past_k, past_v (L, B, H, S, Dh) in ``dtype``, key_step, key_pos (B, S) of rows (B,).

        out: preallocated (past_k, past_v) buffers of that shape and dtype to copy into. A
        fresh tensor of tens of MB per step costs more in page faults than the copy itself
        (measured: 15.7 ms against 1.1 ms for 32 gr2-tiny episodes on CPU).
        """
        if out is None:
            past_k = self.k.index_select(1, rows).to(dtype)
            past_v = self.v.index_select(1, rows).to(dtype)
        elif self.dtype == dtype:
            past_k = torch.index_select(self.k, 1, rows, out=out[0])
            past_v = torch.index_select(self.v, 1, rows, out=out[1])
        else:  # stored narrower (bf16/fp8): gather, then widen into the buffers
            past_k = out[0].copy_(self.k.index_select(1, rows))
            past_v = out[1].copy_(self.v.index_select(1, rows))
        return (
            past_k,
            past_v,
            self.key_step.index_select(0, rows),
            self.key_pos.index_select(0, rows),
        )

    def gather_buffers(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Empty (past_k, past_v) buffers for ``gather(out=...)`` of ``batch`` rows."""
        shape = (self.k.shape[0], batch, *self.k.shape[2:])
        with torch.inference_mode():  # inference tensors, as everything a runner is given
            return (
                torch.empty(shape, device=self.k.device, dtype=dtype),
                torch.empty(shape, device=self.k.device, dtype=dtype),
            )

    def write(self, rows: Tensor, step: Tensor, new_k: Tensor, new_v: Tensor) -> None:
        """Store the P new keys/values (L, B, H, P, Dh) of ``step`` (B,) in rows (B,) at slot
        ``step mod h``, and record what they hold."""
        index = step_write_index(self.cfg, step)  # (B, P)
        r = rows[:, None]
        self.k[:, r, :, index] = new_k.permute(1, 3, 0, 2, 4).to(self.dtype)
        self.v[:, r, :, index] = new_v.permute(1, 3, 0, 2, 4).to(self.dtype)
        self.key_step[r, index] = step[:, None]
        self.key_pos[r, index] = step_key_positions(self.cfg, step)
