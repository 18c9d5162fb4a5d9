"""Training losses of the two GR-2 stages (DESIGN.md section 3).

- Video pre-training: next-frame image tokens only. No states (the learned "no state"
  token), no actions, no [ACT] queries: the layout is the fine-tuning one, so nothing is
  lost between the stages.
- Robot fine-tuning: next-frame image tokens + the CVAE action loss at every step of the
  clip (Smooth-L1 on the arm, BCE on the gripper, KL to the prior).

Clips are T whole steps, T > h (e.g. 2h-4h), so the model learns what flows through the
window from older steps. The next-frame loss covers the frames of steps 1..T-1: each is
predicted token by token from its [LANG] on, given the steps before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import (
    binary_cross_entropy_with_logits,
    cross_entropy,
    smooth_l1_loss,
)

from gr2_policy.model.policy import GR2Policy
from gr2_policy.model.rotations import matrix_to_rot6d, quat_to_matrix


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; the defaults of the two stages are below."""

    image: float
    arm: float = 1.0
    gripper: float = 0.01
    kl: float = 1.0


PRETRAIN_WEIGHTS = LossWeights(image=1.0, arm=0.0, gripper=0.0, kl=0.0)
FINETUNE_WEIGHTS = LossWeights(image=0.1)


@dataclass(frozen=True)
class VideoBatch:
    """A batch of video clips: frozen text embeddings (B, text_embed_dim) from
    ``GR2Policy.embed_text`` and image token ids (B, T, V, N) from the frozen VQGAN."""

    text_embedding: Tensor
    image_tokens: Tensor


@dataclass(frozen=True)
class RobotBatch(VideoBatch):
    """A batch of robot clips: raw states (B, T, 8) (position m, quat wxyz, gripper 0..1),
    the k future waypoints after each step (B, T, k, 8) in the same raw form, and which of
    them exist (B, T, k) bool (the end of an episode has fewer than k). ``state_valid``
    (B, T) bool hides states from the model (the "no state" token); the action targets
    stay relative to the true states. None: every state is shown."""

    states: Tensor
    actions: Tensor
    action_valid: Tensor
    state_valid: Tensor | None = None


def action_targets(states: Tensor, actions: Tensor, position_scale_m: float) -> Tensor:
    """Raw head targets (B, T, k, 10) from absolute waypoints, the inverse of
    ``GR2Policy.decode_actions``: position offset / scale, rotation in the current
    end-effector frame as 6-D, gripper closed (1) or open (0)."""
    current = states[:, :, None]
    position = (actions[..., :3] - current[..., :3]) / position_scale_m
    r_current = quat_to_matrix(current[..., 3:7])
    rotation = matrix_to_rot6d(r_current.transpose(-1, -2) @ quat_to_matrix(actions[..., 3:7]))
    gripper = (actions[..., 7:8] > 0.5).to(actions.dtype)
    return torch.cat((position, rotation, gripper), dim=-1)


def image_token_loss(policy: GR2Policy, hidden: Tensor, image_tokens: Tensor) -> Tensor:
    """Mean cross-entropy of the next-frame tokens of steps 1..T-1.

    hidden (B, T, P, d) from the GPT; the output at in-step index u predicts image token u
    of the same step (index 0 is [LANG], u >= 1 the image token u - 1).
    """
    b, t = image_tokens.shape[:2]
    if t < 2:
        raise ValueError("the next-frame loss needs clips of at least 2 steps")
    vn = policy.config.image_tokens_per_step
    logits = policy.gpt.image_logits(hidden[:, 1:, :vn])  # (B, T-1, V*N, K)
    targets = image_tokens[:, 1:].reshape(b, t - 1, vn)
    return cross_entropy(logits.flatten(0, 2), targets.flatten())


def pretrain_loss(
    policy: GR2Policy, batch: VideoBatch, weights: LossWeights = PRETRAIN_WEIGHTS
) -> dict[str, Tensor]:
    """Video-only next-frame loss: {"image", "total"}."""
    b, t = batch.image_tokens.shape[:2]
    device = batch.image_tokens.device
    states = torch.zeros(b, t, policy.config.state_dim, device=device)
    no_state = torch.zeros(b, t, dtype=torch.bool, device=device)
    lang = policy.gpt.project_language(batch.text_embedding)
    out = policy(lang, batch.image_tokens, states, no_state, act_steps="none")
    image = image_token_loss(policy, out.hidden, batch.image_tokens)
    return {"image": image, "total": weights.image * image}


def finetune_loss(
    policy: GR2Policy,
    batch: RobotBatch,
    weights: LossWeights = FINETUNE_WEIGHTS,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Next-frame + CVAE action loss: {"image", "arm", "gripper", "kl", "total"}.

    The CVAE encoder sees the true k-step trajectory and the [ACT] feature, z is drawn
    with the reparameterisation trick (``generator`` for reproducibility), and the decoder
    reconstructs the trajectory from (z, [ACT]). Arm and gripper terms average over the
    waypoints that exist; KL is summed over latent dims and averaged over steps.
    """
    cfg = policy.config
    lang = policy.gpt.project_language(batch.text_embedding)
    out = policy(lang, batch.image_tokens, batch.states, batch.state_valid, act_steps="all")
    image = image_token_loss(policy, out.hidden, batch.image_tokens)

    b, t = batch.image_tokens.shape[:2]
    targets = action_targets(batch.states, batch.actions, cfg.action_position_scale_m)
    act = out.act.reshape(b * t, -1)
    targets = targets.reshape(b * t, cfg.action_horizon, -1)
    mu, logvar = policy.action_head.encode(act, targets)
    noise = torch.randn(mu.shape, generator=generator, device="cpu").to(mu)
    z = mu + noise * (0.5 * logvar).exp()
    predicted = policy.action_head.decode(act, z)

    valid = batch.action_valid.reshape(b * t, cfg.action_horizon).to(predicted.dtype)
    count = valid.sum().clamp_min(1.0)
    arm = smooth_l1_loss(predicted[..., :9], targets[..., :9], reduction="none").mean(-1)
    arm = (arm * valid).sum() / count
    gripper = binary_cross_entropy_with_logits(predicted[..., 9], targets[..., 9], reduction="none")
    gripper = (gripper * valid).sum() / count
    kl = (-0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1)).mean()
    total = weights.image * image + weights.arm * arm + weights.gripper * gripper
    total = total + weights.kl * kl
    return {"image": image, "arm": arm, "gripper": gripper, "kl": kl, "total": total}
