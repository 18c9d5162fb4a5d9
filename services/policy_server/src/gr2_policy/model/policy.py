"""GR2Policy: frozen text encoder + frozen VQ tokenizer + GPT backbone + CVAE action head.

The engine calls ``encode_instruction`` once per episode, ``tokenize_images`` once per step,
and ``predict_actions`` over the window of the last T <= h steps (oldest first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gr2_policy.model.action_head import CVAEActionHead
from gr2_policy.model.config import GR2Config
from gr2_policy.model.gpt import GR2GPT
from gr2_policy.model.rotations import matrix_to_quat, quat_to_matrix, rot6d_to_matrix
from gr2_policy.model.text_encoder import ByteTextEncoder, TextEncoder
from gr2_policy.model.vqgan import VQGAN


@dataclass(frozen=True)
class ActionPrediction:
    """k absolute waypoints per batch item, in the robot base frame.

    positions (B, k, 3) metres; quats_wxyz (B, k, 4) unit, w >= 0; grippers (B, k) in [0, 1].
    """

    positions: Tensor
    quats_wxyz: Tensor
    grippers: Tensor


class GR2Policy(nn.Module):
    """The GR-2 network. Text encoder and VQ tokenizer are frozen (no grad, eval mode)."""

    def __init__(self, config: GR2Config) -> None:
        super().__init__()
        self.config = config
        self.text_encoder: TextEncoder = ByteTextEncoder(
            config.text_dim, config.text_layers, config.text_heads, config.text_max_len
        )
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

    def encode_instruction(self, texts: list[str]) -> Tensor:
        """Instructions (B strings) -> LANG embeddings (B, d_model)."""
        return self.gpt.project_language(self.text_encoder.encode(texts))

    def tokenize_images(self, images: Tensor) -> Tensor:
        """uint8 images (B, V, H, W, 3), views in ``config.views`` order -> ids (B, V, N)."""
        b, v = images.shape[:2]
        if v != len(self.config.views):
            raise ValueError(f"expected {len(self.config.views)} views, got {v}")
        return self.vqgan.encode(images.reshape(b * v, *images.shape[2:])).view(b, v, -1)

    def act_features(
        self,
        lang: Tensor,
        image_tokens: Tensor,
        states: Tensor,
        step_valid: Tensor,
        state_valid: Tensor | None = None,
    ) -> Tensor:
        """The [ACT] output (B, d_model) for a window; arguments as in ``predict_actions``."""
        cfg = self.config
        b, t = step_valid.shape
        expected = (b, t, len(cfg.views), cfg.tokens_per_view)
        if not 1 <= t <= cfg.history or tuple(image_tokens.shape) != expected:
            raise ValueError(
                f"expected image_tokens {expected} with 1 <= T <= h={cfg.history}, "
                f"got {tuple(image_tokens.shape)}"
            )
        if tuple(states.shape) != (b, t, cfg.state_dim) or tuple(lang.shape) != (b, cfg.d_model):
            raise ValueError(
                f"expected states {(b, t, cfg.state_dim)} and lang {(b, cfg.d_model)}, "
                f"got {tuple(states.shape)} and {tuple(lang.shape)}"
            )
        if state_valid is None:
            state_valid = step_valid
        return self.gpt(lang, image_tokens, states, state_valid & step_valid, step_valid)

    def predict_actions(
        self,
        lang: Tensor,
        image_tokens: Tensor,
        states: Tensor,
        step_valid: Tensor,
        state_valid: Tensor | None = None,
        z: Tensor | None = None,
    ) -> ActionPrediction:
        """k absolute waypoints from a window of T <= h steps, most recent step last.

        lang (B, d_model) from ``encode_instruction``; image_tokens (B, T, V, N) long;
        states (B, T, 8): ee position (m, base frame), quat wxyz, gripper (0..1);
        step_valid (B, T) bool, False for left padding (the current pose is the last valid
        step's state);
        state_valid (B, T) bool, False to use the learned "no state" embedding (default:
        step_valid); z (B, latent_dim) CVAE latent, None = 0 (inference).
        """
        if not bool(step_valid.any(dim=1).all()):
            raise ValueError("every batch item needs at least one valid step")
        act = self.act_features(lang, image_tokens, states, step_valid, state_valid)
        raw = self.action_head.decode(act, z)
        t = step_valid.shape[1]
        # Index of the last valid step: the first True when reading the steps backwards.
        last = t - 1 - step_valid.flip(1).to(torch.int8).argmax(dim=1)
        current = states[torch.arange(states.shape[0], device=states.device), last]
        return self.decode_actions(raw, current)

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
