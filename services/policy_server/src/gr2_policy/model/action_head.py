"""CVAE action head (as in GR-MG): the [ACT] feature -> k raw action vectors.

Raw action per waypoint (10 values): position (3, in units of ``action_position_scale_m``,
relative to the current position), 6-D rotation (6, relative to the current orientation),
gripper logit (1). ``GR2Policy.decode_actions`` turns these into absolute poses.

- encoder (training only): [CLS, ACT, k action tokens] -> (mu, logvar), latent ``latent_dim``;
- decoder: [z, ACT, k learned queries] -> one raw action per query. At inference z = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gr2_policy.model.config import ENCODED_STATE_DIM, GR2Config
from gr2_policy.model.gpt import INIT_STD, Block, init_transformer_
from gr2_policy.model.rotations import identity_rot6d

# Std of the output layer: with unit-variance features raw outputs are ~0.05-0.2, i.e. ~1 cm
# and a few degrees at the default scale, so an untrained model moves gently, not wildly.
OUTPUT_INIT_STD = 5e-3


class CVAEActionHead(nn.Module):
    """Conditional VAE over k-step action trajectories, conditioned on the [ACT] feature."""

    def __init__(self, cfg: GR2Config) -> None:
        super().__init__()
        d, k = cfg.action_head_dim, cfg.action_horizon
        self.latent_dim = cfg.latent_dim
        self.act_in = nn.Linear(cfg.d_model, d)
        # Decoder.
        self.z_in = nn.Linear(cfg.latent_dim, d)
        self.queries = nn.Parameter(torch.empty(k, d))
        self.dec_pos = nn.Parameter(torch.empty(k + 2, d))
        self.decoder = nn.ModuleList(
            Block(d, cfg.action_head_heads) for _ in range(cfg.action_head_layers)
        )
        self.dec_norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, ENCODED_STATE_DIM)
        # Encoder (training only).
        self.action_in = nn.Linear(ENCODED_STATE_DIM, d)
        self.enc_cls = nn.Parameter(torch.empty(1, d))
        self.enc_pos = nn.Parameter(torch.empty(k + 2, d))
        self.encoder = nn.ModuleList(
            Block(d, cfg.action_head_heads) for _ in range(cfg.action_head_layers)
        )
        self.enc_norm = nn.LayerNorm(d)
        self.to_latent = nn.Linear(d, 2 * cfg.latent_dim)

        init_transformer_(self, cfg.action_head_layers)
        nn.init.normal_(self.out.weight, std=OUTPUT_INIT_STD)
        # Bias = identity rotation, so a zero feature means "stay where you are".
        with torch.no_grad():
            self.out.bias.zero_()
            self.out.bias[3:9] = identity_rot6d()
        nn.init.zeros_(self.to_latent.weight)  # start at the prior: mu = 0, logvar = 0
        for p in (self.queries, self.dec_pos, self.enc_cls, self.enc_pos):
            nn.init.normal_(p, std=INIT_STD)

    def encode(self, act_feature: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """act_feature (B, d_model), true raw actions (B, k, 10) -> mu, logvar (B, latent)."""
        b = act_feature.shape[0]
        x = torch.cat(
            (
                self.enc_cls.expand(b, 1, -1),
                self.act_in(act_feature)[:, None],
                self.action_in(actions),
            ),
            dim=1,
        )
        x = x + self.enc_pos
        for block in self.encoder:
            x = block(x)
        mu, logvar = self.to_latent(self.enc_norm(x[:, 0])).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, act_feature: Tensor, z: Tensor | None = None) -> Tensor:
        """act_feature (B, d_model), z (B, latent) or None (= 0) -> raw actions (B, k, 10)."""
        b = act_feature.shape[0]
        if z is None:
            z = act_feature.new_zeros(b, self.latent_dim)
        x = torch.cat(
            (
                self.z_in(z)[:, None],
                self.act_in(act_feature)[:, None],
                self.queries.expand(b, -1, -1),
            ),
            dim=1,
        )
        x = x + self.dec_pos
        for block in self.decoder:
            x = block(x)
        return self.out(self.dec_norm(x[:, 2:]))
