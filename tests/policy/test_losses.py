"""Training losses of both stages: targets invert the action decoding, gradients reach only
the trainable parts, and gr2-tiny overfits a small fixed batch (loss / 10) on CPU."""

from __future__ import annotations

import pytest
import torch
from gr2_policy.model import GR2Policy, init_random_policy
from gr2_policy.model.losses import (
    FINETUNE_WEIGHTS,
    PRETRAIN_WEIGHTS,
    RobotBatch,
    VideoBatch,
    action_targets,
    finetune_loss,
    pretrain_loss,
)
from gr2_policy.model.rotations import quat_normalize, rot6d_to_matrix

CLIP_STEPS = 6  # > h = 4: the model must learn what flows through the window


def robot_batch(policy: GR2Policy, batch: int, seed: int) -> RobotBatch:
    """A fixed random batch: smooth trajectories, k future waypoints per step."""
    cfg = policy.config
    gen = torch.Generator().manual_seed(seed)
    t, k = CLIP_STEPS, cfg.action_horizon
    total = t + k
    start = torch.rand(batch, 1, 3, generator=gen) * 0.4 + 0.2
    velocity = (torch.rand(batch, 1, 3, generator=gen) - 0.5) * 0.02
    positions = start + velocity * torch.arange(total)[None, :, None]
    quats = quat_normalize(torch.randn(batch, 1, 4, generator=gen)).expand(batch, total, 4)
    grippers = (torch.arange(total) >= total // 2).float()[None, :, None].expand(batch, total, 1)
    trajectory = torch.cat((positions, quats, grippers), dim=-1)  # (B, t + k, 8)
    states = trajectory[:, :t]
    actions = torch.stack([trajectory[:, s + 1 : s + 1 + k] for s in range(t)], dim=1)
    valid = torch.ones(batch, t, k, dtype=torch.bool)
    valid[:, -1, -3:] = False  # the end of an episode: fewer than k waypoints exist
    tokens = torch.randint(
        0, cfg.codebook_size, (batch, t, len(cfg.views), cfg.tokens_per_view), generator=gen
    )
    text = policy.embed_text([f"move the arm {i}" for i in range(batch)])
    return RobotBatch(
        text_embedding=text,
        image_tokens=tokens,
        states=states,
        actions=actions,
        action_valid=valid,
    )


def has_grad(p: torch.nn.Parameter) -> bool:
    """A non-zero gradient (``torch.where`` gives the unused branch a zero one)."""
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_loss_weights_are_the_design_defaults() -> None:
    assert (PRETRAIN_WEIGHTS.image, PRETRAIN_WEIGHTS.arm, PRETRAIN_WEIGHTS.kl) == (1.0, 0.0, 0.0)
    assert (FINETUNE_WEIGHTS.image, FINETUNE_WEIGHTS.arm) == (0.1, 1.0)
    assert (FINETUNE_WEIGHTS.gripper, FINETUNE_WEIGHTS.kl) == (0.01, 1.0)


def test_action_targets_invert_decode_actions() -> None:
    policy = init_random_policy("gr2-tiny", seed=0)
    gen = torch.Generator().manual_seed(1)
    k = policy.config.action_horizon
    state = torch.cat(
        (
            torch.rand(4, 3, generator=gen),
            quat_normalize(torch.randn(4, 4, generator=gen)),
            torch.rand(4, 1, generator=gen),
        ),
        dim=-1,
    )
    raw = torch.randn(4, k, 10, generator=gen)
    decoded = policy.decode_actions(raw, state)
    absolute = torch.cat(
        (decoded.positions, decoded.quats_wxyz, (decoded.grippers > 0.5)[..., None].float()), -1
    )
    targets = action_targets(state[:, None], absolute[:, None], 0.1)[:, 0]
    torch.testing.assert_close(targets[..., :3], raw[..., :3], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        rot6d_to_matrix(targets[..., 3:9]), rot6d_to_matrix(raw[..., 3:9]), atol=1e-4, rtol=0
    )
    assert torch.equal(targets[..., 9], (raw[..., 9] > 0).float())


def test_gradients_reach_only_the_trainable_parts() -> None:
    policy = init_random_policy("gr2-tiny", seed=0).train()
    loss = finetune_loss(policy, robot_batch(policy, 2, seed=0))["total"]
    loss.backward()
    for name, p in policy.named_parameters():
        frozen = name.startswith(("text_encoder.", "vqgan."))
        assert (p.grad is None) == frozen, name
    trained = [n for n, p in policy.gpt.named_parameters() if has_grad(p)]
    assert "image_head.weight" in trained and "act_query" in trained
    assert "state_proj.weight" in trained and "no_state" not in trained


def test_pretraining_needs_no_states_or_actions() -> None:
    policy = init_random_policy("gr2-tiny", seed=0).train()
    batch = robot_batch(policy, 2, seed=0)
    video = VideoBatch(text_embedding=batch.text_embedding, image_tokens=batch.image_tokens)
    loss = pretrain_loss(policy, video)
    loss["total"].backward()
    assert has_grad(policy.gpt.no_state)  # the "no state" token stands in
    assert not has_grad(policy.gpt.state_proj.weight)
    assert not any(has_grad(p) for p in policy.action_head.parameters())


def overfit(policy: GR2Policy, loss_fn, max_steps: int) -> tuple[float, float, int]:
    """Adam on one fixed batch until the loss is a tenth of the first; (first, last, steps)."""
    policy.train()
    optimiser = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=2e-3)
    first = last = float("nan")
    for step in range(max_steps):
        loss = loss_fn()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        last = float(loss.detach())
        if step == 0:
            first = last
        elif last < first / 10:
            break
    return first, last, step + 1


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_tiny_model_overfits_a_fixed_batch(stage: str) -> None:
    torch.manual_seed(0)
    policy = init_random_policy("gr2-tiny", seed=0)
    batch = robot_batch(policy, 2, seed=3)
    generator = torch.Generator().manual_seed(0)
    if stage == "pretrain":
        video = VideoBatch(text_embedding=batch.text_embedding, image_tokens=batch.image_tokens)

        def loss_fn() -> torch.Tensor:
            return pretrain_loss(policy, video)["total"]
    else:

        def loss_fn() -> torch.Tensor:
            return finetune_loss(policy, batch, generator=generator)["total"]

    first, last, steps = overfit(policy, loss_fn, max_steps=400)
    print(f"{stage}: loss {first:.3f} -> {last:.4f} in {steps} Adam steps")
    assert last < first / 10
