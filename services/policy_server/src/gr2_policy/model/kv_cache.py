"""Rolling KV cache: the keys/values of the last h steps per layer, preallocated.

Layout per layer: (B, H, h*P + 1, head_dim). Step s lives in slot s mod h, keys
(s mod h)*P .. (s mod h)*P + P - 1, so writing step s overwrites step s-h, which no later
token may see (Mistral's rolling buffer, at step granularity). The one extra key at the end
is the scratch slot of the [ACT] query: written by each action step, seen only by that
step's [ACT] (never cached in the sense that no token ever attends to it).

Next to the buffers each key slot records the step and position of what it holds
(``key_step``, ``key_pos``), so the attention mask follows from the one attention rule of
``gpt.py``: stale keys (an overwritten step, or the not-yet-written tail of the slot being
filled) are out of the step window and masked by that rule alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gr2_policy.model.config import GR2Config

# key_step of a never-written slot: far outside any step window.
EMPTY_STEP = -(2**40)


@dataclass
class CacheSnapshot:
    """Saved contents of some slots of one cache, for ``RollingKVCache.restore``."""

    slots: list[list[int]]  # per batch item, the slot numbers saved
    k: list[Tensor]
    v: list[Tensor]
    key_step: list[Tensor]
    key_pos: list[Tensor]
    next_step: Tensor


class RollingKVCache:
    """KV buffers of B episodes; ``next_step`` (B,) is the step each appends next."""

    def __init__(
        self,
        cfg: GR2Config,
        batch: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        h, p = cfg.history, cfg.tokens_per_step
        self.history, self.tokens_per_step = h, p
        self.scratch = h * p  # index of the [ACT] scratch key
        shape = (cfg.n_layers, batch, cfg.n_heads, h * p + 1, cfg.d_model // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_step = torch.full((batch, h * p + 1), EMPTY_STEP, device=device)
        self.key_pos = torch.zeros((batch, h * p + 1), dtype=torch.long, device=device)
        self.key_act = torch.zeros(h * p + 1, dtype=torch.bool, device=device)
        self.key_act[self.scratch] = True
        self.next_step = torch.zeros(batch, dtype=torch.long, device=device)
        self._in_step = torch.arange(p, device=device)

    @property
    def batch(self) -> int:
        return self.next_step.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key/value buffers."""
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        """Forget everything (a new episode in the same buffers)."""
        self.key_step.fill_(EMPTY_STEP)
        self.key_pos.zero_()
        self.next_step.zero_()

    def claim(
        self, step: Tensor, start: int, count: int, with_act: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Reserve key slots for ``count`` tokens of ``step`` (B,) at in-step indices
        start..start+count-1 (+ the [ACT] scratch slot) and record their step/position.

        Returns write_index (B, S), and the queries' step (B, S), position (B, S) and
        [ACT] flags (S,), with S = count (+1 with [ACT]).
        """
        p = self.tokens_per_step
        if start < 0 or start + count > p:
            raise ValueError(f"tokens {start}..{start + count - 1} are outside a step of {p}")
        in_step = self._in_step[start : start + count]
        write_index = ((step % self.history) * p)[:, None] + in_step  # (B, count)
        q_pos = (step * p)[:, None] + in_step
        q_step = step[:, None].expand(-1, count)
        if with_act:
            scratch = torch.full_like(step, self.scratch)[:, None]
            write_index = torch.cat((write_index, scratch), dim=1)
            q_pos = torch.cat((q_pos, (step + 1)[:, None] * p), dim=1)
            q_step = torch.cat((q_step, step[:, None]), dim=1)
        rows = torch.arange(step.shape[0], device=step.device)[:, None]
        self.key_step[rows, write_index] = q_step
        self.key_pos[rows, write_index] = q_pos
        q_act = torch.zeros(write_index.shape[1], dtype=torch.bool, device=step.device)
        q_act[count:] = True
        return write_index, q_step, q_pos, q_act

    def _slot_keys(self, slots: list[int]) -> Tensor:
        """Key indices of whole step slots, in slot order."""
        p = self.tokens_per_step
        return (torch.tensor(slots)[:, None] * p + torch.arange(p)).flatten().to(self.k.device)

    def snapshot(self, steps_ahead: int) -> CacheSnapshot:
        """Save the slots that the next ``steps_ahead`` steps would overwrite."""
        h = self.history
        snap = CacheSnapshot(
            slots=[], k=[], v=[], key_step=[], key_pos=[], next_step=self.next_step.clone()
        )
        for item, first in enumerate(self.next_step.tolist()):
            slots = sorted({(first + ahead) % h for ahead in range(steps_ahead)})
            keys = self._slot_keys(slots)
            snap.slots.append(slots)
            snap.k.append(self.k[:, item].index_select(2, keys))
            snap.v.append(self.v[:, item].index_select(2, keys))
            snap.key_step.append(self.key_step[item, keys])
            snap.key_pos.append(self.key_pos[item, keys])
        return snap

    def restore(self, snap: CacheSnapshot) -> None:
        """Put back what ``snapshot`` saved (and the step counter): the cache is then
        bit-identical to the moment of the snapshot, apart from the [ACT] scratch slot.
        Works in any grad mode (a generator closed by the garbage collector runs this)."""
        with torch.inference_mode(self.k.is_inference()):
            self._restore(snap)

    def _restore(self, snap: CacheSnapshot) -> None:
        for item, slots in enumerate(snap.slots):
            keys = self._slot_keys(slots)
            self.k[:, item].index_copy_(2, keys, snap.k[item])
            self.v[:, item].index_copy_(2, keys, snap.v[item])
            self.key_step[item, keys] = snap.key_step[item]
            self.key_pos[item, keys] = snap.key_pos[item]
        self.next_step.copy_(snap.next_step)
