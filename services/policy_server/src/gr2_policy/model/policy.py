"""GR2Policy: frozen text encoder + frozen VQGAN tokenizer + GPT backbone + CVAE action head.

Two ways to run it, with the same result (the parity tests hold them to 1e-4 in fp32):

- full forward (``forward``, ``predict_actions``): a window of whole steps, for training and
  for the no-cache server mode (the last R = L(h-1)+1 steps);
- incremental (``new_cache``, ``step``, ``generate_frames``): one call per control step
  appends the step to a rolling KV cache and returns the action chunk; video generation
  continues the cache token by token and rolls it back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gr2_policy.model.action_head import CVAEActionHead
from gr2_policy.model.config import GR2Config
from gr2_policy.model.gpt import GR2GPT, GPTOutput
from gr2_policy.model.kv_cache import RollingKVCache
from gr2_policy.model.rotations import (
    matrix_to_quat,
    quat_to_matrix,
    quat_to_rot6d,
    rot6d_to_matrix,
)
from gr2_policy.model.sampling import Sampling, sample_tokens
from gr2_policy.model.text_encoder import TextEncoder, build_text_encoder
from gr2_policy.model.vqgan import VQGAN


@dataclass(frozen=True)
class ActionPrediction:
    """k absolute waypoints per batch item, in the robot base frame.

    positions (B, k, 3) metres; quats_wxyz (B, k, 4) unit, w >= 0; grippers (B, k) in [0, 1].
    """

    positions: Tensor
    quats_wxyz: Tensor
    grippers: Tensor


@dataclass(frozen=True)
class StepOutput:
    """What one cached step returns: the action chunk and the [ACT] feature (B, d_model)
    it came from, and (when asked for) the logits of the step's own image tokens given
    everything before each of them (B, V*N, K)."""

    actions: ActionPrediction | None
    act_feature: Tensor | None
    image_logits: Tensor | None


def _check_num_frames(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


def encode_states(states: Tensor) -> Tensor:
    """Raw states (..., 8): position, quat wxyz, gripper -> (..., 10) with a 6-D rotation."""
    return torch.cat((states[..., :3], quat_to_rot6d(states[..., 3:7]), states[..., 7:8]), -1)


class GR2Policy(nn.Module):
    """The GR-2 network. Text encoder and VQGAN are frozen (no grad, always eval mode)."""

    def __init__(self, config: GR2Config) -> None:
        super().__init__()
        self.config = config
        self.text_encoder: TextEncoder = build_text_encoder(config)
        self.vqgan = VQGAN(config)
        self.gpt = GR2GPT(config)
        self.action_head = CVAEActionHead(config)
        for frozen in (self.text_encoder, self.vqgan):
            frozen.requires_grad_(False)
            frozen.eval()

    def train(self, mode: bool = True) -> GR2Policy:
        """Switch the trainable parts; the frozen parts always stay in eval mode."""
        super().train(mode)
        self.text_encoder.eval()
        self.vqgan.eval()
        return self

    # -- inputs ------------------------------------------------------------------------

    def embed_text(self, texts: list[str]) -> Tensor:
        """Instructions (B strings) -> frozen text embeddings (B, text_embed_dim)."""
        with torch.no_grad():
            return self.text_encoder.encode(texts)

    def encode_instruction(self, texts: list[str]) -> Tensor:
        """Instructions (B strings) -> LANG embeddings (B, d_model). Once per episode."""
        return self.gpt.project_language(self.embed_text(texts))

    def tokenize_images(self, images: Tensor) -> Tensor:
        """uint8 images (..., V, H, W, 3), views in ``config.views`` order -> ids (..., V, N)."""
        n_views = len(self.config.views)
        if images.dim() < 5 or images.shape[-4] != n_views:
            raise ValueError(
                f"expected images (..., {n_views}, H, W, 3), got {tuple(images.shape)}"
            )
        lead = images.shape[:-3]
        ids = self.vqgan.encode(images.reshape(-1, *images.shape[-3:]))
        return ids.view(*lead, -1)

    def embed_steps(
        self, lang: Tensor, image_tokens: Tensor, states: Tensor, state_valid: Tensor
    ) -> Tensor:
        """lang (B, d), image_tokens (B, T, V, N) long, raw states (B, T, 8), state_valid
        (B, T) bool -> token embeddings (B, T, P, d) in layout order."""
        cfg = self.config
        b, t = image_tokens.shape[:2]
        expected = (b, t, len(cfg.views), cfg.tokens_per_view)
        if tuple(image_tokens.shape) != expected:
            raise ValueError(f"expected image_tokens {expected}, got {tuple(image_tokens.shape)}")
        if tuple(states.shape) != (b, t, cfg.state_dim) or tuple(lang.shape) != (b, cfg.d_model):
            raise ValueError(
                f"expected states {(b, t, cfg.state_dim)} and lang {(b, cfg.d_model)}, "
                f"got {tuple(states.shape)} and {tuple(lang.shape)}"
            )
        codes = self.vqgan.code_vectors(image_tokens.reshape(b, t, -1))
        state_in = encode_states(torch.where(state_valid[..., None], states, 0.0))
        return self.gpt.assemble_steps(
            lang,
            self.gpt.embed_images(codes, lang),
            self.gpt.embed_state(state_in, state_valid),
        )

    # -- full forward ------------------------------------------------------------------

    def forward(
        self,
        lang: Tensor,
        image_tokens: Tensor,
        states: Tensor,
        state_valid: Tensor | None = None,
        first_step: int = 0,
        act_steps: str = "last",
    ) -> GPTOutput:
        """The GPT over T whole steps (see ``GR2GPT.forward``); state_valid defaults to all
        True. ``first_step`` is the episode step of the first given step."""
        if state_valid is None:
            state_valid = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        steps = self.embed_steps(lang, image_tokens, states, state_valid)
        return self.gpt(steps, first_step=first_step, act_steps=act_steps)

    def predict_actions(
        self,
        lang: Tensor,
        image_tokens: Tensor,
        states: Tensor,
        first_step: int = 0,
        z: Tensor | None = None,
    ) -> ActionPrediction:
        """k absolute waypoints after the last of T steps, recomputed from those T steps.

        With T >= R (or the whole episode so far) this equals the cached ``step``.
        """
        out = self(lang, image_tokens, states, first_step=first_step, act_steps="last")
        return self.decode_actions(self.action_head.decode(out.act[:, 0], z), states[:, -1])

    def decode_actions(self, raw: Tensor, current_state: Tensor) -> ActionPrediction:
        """Raw head outputs (B, k, 10) + current state (B, 8) -> absolute waypoints.

        position = current + action_position_scale_m * raw[..., :3];
        rotation = R_current @ R(raw[..., 3:9]) (the 6-D output is a rotation in the
        end-effector frame); gripper = sigmoid(raw[..., 9]).
        """
        pos = current_state[:, None, :3] + self.config.action_position_scale_m * raw[..., :3]
        r_current = quat_to_matrix(current_state[:, 3:7])[:, None]  # (B, 1, 3, 3)
        quats = matrix_to_quat(r_current @ rot6d_to_matrix(raw[..., 3:9]))
        return ActionPrediction(positions=pos, quats_wxyz=quats, grippers=raw[..., 9].sigmoid())

    # -- incremental -------------------------------------------------------------------

    def new_cache(self, batch: int = 1) -> RollingKVCache:
        """An empty rolling KV cache for ``batch`` episodes on the model's device/dtype."""
        weight = self.gpt.image_in.weight
        return RollingKVCache(self.config, batch, device=weight.device, dtype=weight.dtype)

    def step(
        self,
        cache: RollingKVCache,
        lang: Tensor,
        image_tokens: Tensor,
        state: Tensor | None,
        *,
        want_actions: bool = True,
        want_image_logits: bool = False,
    ) -> StepOutput:
        """Append one step per episode to ``cache`` and answer it.

        image_tokens (B, V, N) long; state (B, 8) raw, or None for "no state" (then no
        actions: they are relative to the current pose).
        """
        if want_actions and state is None:
            raise ValueError("actions need the current state")
        b = image_tokens.shape[0]
        if state is None:
            state = lang.new_zeros(b, self.config.state_dim)
            valid = torch.zeros(b, 1, dtype=torch.bool, device=lang.device)
        else:
            valid = torch.ones(b, 1, dtype=torch.bool, device=lang.device)
        x = self.embed_steps(lang, image_tokens[:, None], state[:, None], valid)[:, 0]
        hidden, act = self.gpt.forward_cached(x, cache, cache.next_step, 0, want_actions)
        cache.next_step += 1
        actions = None
        if act is not None:
            actions = self.decode_actions(self.action_head.decode(act), state)
        logits = None
        if want_image_logits:
            logits = self.gpt.image_logits(hidden[:, : self.config.image_tokens_per_step])
        return StepOutput(actions=actions, act_feature=act, image_logits=logits)

    def generate_frames(
        self, cache: RollingKVCache, lang: Tensor, num_frames: int, sampling: Sampling
    ) -> Tensor:
        """The next ``num_frames`` frames of every view, token by token, continuing the
        episode in ``cache`` -> ids (B, F, V, N). Imagined steps carry the "no state"
        token. The cache is rolled back afterwards (bit-identical, step counter included).
        """
        frames = [
            ids for ids in self.iter_video(cache, lang, num_frames, sampling) if ids is not None
        ]
        return torch.stack(frames, dim=1)

    def iter_video(
        self, cache: RollingKVCache, lang: Tensor, num_frames: int, sampling: Sampling
    ) -> Iterator[Tensor | None]:
        """``generate_frames`` one image token per ``next()``: yields None after each token
        but a frame's last, and the frame's ids (B, V, N) after its last. A server runs it a
        few tokens at a time between control steps. The cache is rolled back when the
        generator is exhausted or closed.
        """
        cfg = self.config
        vn, b = cfg.image_tokens_per_step, cache.batch
        _check_num_frames(num_frames)
        generator = sampling.generator()
        no_state = self.gpt.no_state.expand(b, 1, -1)
        snapshot = cache.snapshot(num_frames)
        try:
            step = cache.next_step.clone()
            for frame in range(num_frames):
                out = torch.empty(b, vn, dtype=torch.long, device=lang.device)
                x = lang[:, None]  # [LANG] of the imagined step: in-step index 0
                for u in range(vn):
                    hidden, _ = self.gpt.forward_cached(x, cache, step, u, with_act=False)
                    token = sample_tokens(self.gpt.image_logits(hidden[:, -1]), sampling, generator)
                    out[:, u] = token
                    x = self.gpt.embed_images(
                        self.vqgan.code_vectors(token)[:, None], lang, start=u
                    )
                    if u + 1 < vn:
                        yield None
                if frame + 1 < num_frames:  # complete the step: last image token + [STATE]
                    self.gpt.forward_cached(
                        torch.cat((x, no_state), dim=1), cache, step, vn, with_act=False
                    )
                step = step + 1
                yield out.view(b, len(cfg.views), cfg.tokens_per_view)
        finally:
            cache.restore(snapshot)

    def generate_frames_uncached(
        self,
        lang: Tensor,
        image_tokens: Tensor,
        states: Tensor,
        state_valid: Tensor | None,
        first_step: int,
        num_frames: int,
        sampling: Sampling,
    ) -> Tensor:
        """``generate_frames`` without a cache: every token recomputes the last R steps
        (the history given plus the imagined ones). Same tokens, for checking and benchmarks.

        image_tokens (B, T, V, N), states (B, T, 8): the episode's last T steps (T >= R-1,
        or the whole episode), the first being episode step ``first_step``.
        """
        cfg = self.config
        vn, r = cfg.image_tokens_per_step, cfg.receptive_field
        b = image_tokens.shape[0]
        _check_num_frames(num_frames)
        if state_valid is None:
            state_valid = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        generator = sampling.generator()
        tokens, states = image_tokens.reshape(b, -1, vn), states
        for _ in range(num_frames):
            tokens = torch.cat((tokens, tokens.new_zeros(b, 1, vn)), dim=1)
            states = torch.cat((states, states.new_zeros(b, 1, cfg.state_dim)), dim=1)
            state_valid = torch.cat((state_valid, state_valid.new_zeros(b, 1)), dim=1)
            keep = min(r, tokens.shape[1])
            offset = tokens.shape[1] - keep
            for u in range(vn):
                out = self(
                    lang,
                    tokens[:, offset:].view(b, keep, len(cfg.views), cfg.tokens_per_view),
                    states[:, offset:],
                    state_valid[:, offset:],
                    first_step=first_step + offset,
                    act_steps="none",
                )
                logits = self.gpt.image_logits(out.hidden[:, -1, u])
                tokens[:, -1, u] = sample_tokens(logits, sampling, generator)
        new = tokens[:, -num_frames:]
        return new.reshape(b, num_frames, len(cfg.views), cfg.tokens_per_view)

    def decode_frames(self, ids: Tensor) -> Tensor:
        """Token ids (..., V, N) -> uint8 pixels (..., V, H, W, 3)."""
        lead = ids.shape[:-1]
        pixels = self.vqgan.decode(ids.reshape(-1, ids.shape[-1]))
        return pixels.view(*lead, *pixels.shape[1:])
