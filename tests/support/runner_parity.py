"""Run an episode through a step runner and through the eager in-place cached step, for the
runner parity tests (cosine >= 0.999 on actions over a 30-step episode, DESIGN.md section 4).

The reference is ``GR2Policy.step`` on a ``RollingKVCache`` in fp32 eager: the path every
runner must agree with. The runner side goes through a ``KVCachePool`` exactly as the engine
does: gather the rows, build mask and RoPE, run, write the new keys back. Batches are padded
to the runner's bucket with the pool's scratch row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gr2_policy.engine.kv_pool import KVCachePool
from gr2_policy.engine.runners.base import StepInputs, StepRunner, bucket_for
from gr2_policy.model.policy import GR2Policy
from gr2_policy.model.step_function import step_layout

INSTRUCTIONS = ("touch the red block", "pick up the green block", "push the blue block left")


@dataclass
class EpisodeActions:
    """Per step, the decoded actions of every episode: positions (T, B, k, 3), quats
    (T, B, k, 4), grippers (T, B, k)."""

    positions: np.ndarray
    quats: np.ndarray
    grippers: np.ndarray

    def flat(self) -> np.ndarray:
        t, b = self.positions.shape[:2]
        return np.concatenate(
            (
                self.positions.reshape(t, b, -1),
                self.quats.reshape(t, b, -1),
                self.grippers.reshape(t, b, -1),
            ),
            axis=-1,
        )


def episode_inputs(model: GR2Policy, steps: int, batch: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Random image tokens (T, B, V, N) and plausible states (T, B, 8), reproducible."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(
        0, cfg.codebook_size, (steps, batch, len(cfg.views), cfg.tokens_per_view), generator=g
    )
    states = torch.zeros(steps, batch, cfg.state_dim)
    states[..., 0:3] = torch.tensor([0.45, 0.0, 0.3]) + 0.05 * torch.randn(
        steps, batch, 3, generator=g
    )
    quat = torch.tensor([0.0, 1.0, 0.0, 0.0]) + 0.1 * torch.randn(steps, batch, 4, generator=g)
    states[..., 3:7] = torch.nn.functional.normalize(quat, dim=-1)
    states[..., 7] = (torch.rand(steps, batch, generator=g) > 0.5).float()
    return tokens, states


def reference_actions(
    model: GR2Policy, tokens: torch.Tensor, states: torch.Tensor, first_steps: list[int]
) -> EpisodeActions:
    """Eager fp32 in-place cached steps (``GR2Policy.step``)."""
    steps, batch = tokens.shape[:2]
    out = []
    with torch.inference_mode():
        cache = model.new_cache(batch)
        cache.next_step.copy_(torch.tensor(first_steps))
        lang = model.encode_instruction(list(INSTRUCTIONS[:batch]))
        for t in range(steps):
            out.append(model.step(cache, lang, tokens[t], states[t]).actions)
    return _stack(out)


def runner_actions(
    model: GR2Policy,
    runner: StepRunner,
    tokens: torch.Tensor,
    states: torch.Tensor,
    first_steps: list[int],
    *,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    cache_dtype: torch.dtype = torch.float32,
) -> EpisodeActions:
    """The same episodes through ``runner`` and a ``KVCachePool`` (rows 0..B-1)."""
    cfg = model.config
    steps, batch = tokens.shape[:2]
    device = torch.device(device)
    pool = KVCachePool(cfg, batch, device=device, dtype=cache_dtype)
    size = bucket_for(batch, runner.buckets)
    rows = torch.tensor(list(range(batch)) + [pool.scratch] * (size - batch), device=device)
    step = torch.tensor(first_steps + [0] * (size - batch), device=device)
    out = []
    with torch.inference_mode():
        lang = model.encode_instruction(list(INSTRUCTIONS[:batch])).to(device)
        lang = torch.cat((lang, lang[:1].expand(size - batch, -1)))
        for t in range(steps):
            pad = size - batch
            image_tokens = tokens[t].reshape(batch, -1).to(device)
            state = states[t].to(device)
            if pad:
                image_tokens = torch.cat((image_tokens, image_tokens[:1].expand(pad, -1)))
                state = torch.cat((state, state[:1].expand(pad, -1)))
            past_k, past_v, key_step, key_pos = pool.gather(rows, compute_dtype)
            mask, rope = step_layout(cfg, step, key_step, key_pos)
            result = runner.run(
                StepInputs(past_k, past_v, mask, rope, lang.to(compute_dtype), image_tokens, state)
            )
            pool.write(rows, step, result.new_k, result.new_v)
            step = step + 1
            actions = model.to(device).decode_actions(result.raw[:batch].float(), state[:batch])
            out.append(actions)
    return _stack(out)


def aligned(a: EpisodeActions, b: EpisodeActions) -> EpisodeActions:
    """b with each quaternion's sign flipped to agree with a's (q and -q are one rotation;
    near w = 0 the w >= 0 convention flips the sign on the slightest difference)."""
    sign = np.where((a.quats * b.quats).sum(-1, keepdims=True) < 0, -1.0, 1.0)
    return EpisodeActions(positions=b.positions, quats=b.quats * sign, grippers=b.grippers)


def cosine(a: EpisodeActions, b: EpisodeActions) -> float:
    """The smallest per-(step, episode) cosine similarity between two action sets
    (quaternion signs aligned)."""
    x, y = a.flat(), aligned(a, b).flat()
    num = (x * y).sum(-1)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return float((num / den).min())


def _stack(preds) -> EpisodeActions:  # type: ignore[no-untyped-def]
    return EpisodeActions(
        positions=torch.stack([p.positions for p in preds]).cpu().double().numpy(),
        quats=torch.stack([p.quats_wxyz for p in preds]).cpu().double().numpy(),
        grippers=torch.stack([p.grippers for p in preds]).cpu().double().numpy(),
    )
