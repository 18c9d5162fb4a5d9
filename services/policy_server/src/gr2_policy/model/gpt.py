"""The GR-2 GPT backbone: token layout, step-level sliding-window mask, pre-norm blocks, RoPE.

Token layout per timestep (P = 2 + V*N tokens)::

    [LANG] [view 1: N image tokens] ... [view V: N image tokens] [STATE]

and after the last step one [ACT] query token. Attention is causal over token order, each
token sees only keys of steps t-h+1..t (t its own step), keys of invalid (padding) steps are
masked out, and [ACT] belongs to the last step, so it sees the whole window while nothing
attends to it. Positions are RoPE on the token index (scores depend only on offsets).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention

from gr2_policy.model.config import ENCODED_STATE_DIM, GR2Config
from gr2_policy.model.rotations import quat_to_rot6d

INIT_STD = 0.02


def rope_tables(n_pos: int, head_dim: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables for positions 0..n_pos-1, each (n_pos, head_dim / 2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(n_pos, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate query/key pairs: x (B, H, S, D), cos/sin (S, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention on ``scaled_dot_product_attention`` with an explicit mask."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """x (B, S, dim); mask bool, True = may attend, broadcastable to (B, H, S, S)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(
        self, x: Tensor, mask: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """x (B, S, dim) -> (B, S, dim)."""
        x = x + self.attn(self.norm1(x), mask, rope)
        return x + self.mlp(self.norm2(x))


def init_transformer_(module: nn.Module, n_layers: int) -> None:
    """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue  # LayerNorm and biases keep PyTorch's defaults (ones / zeros set below)
        residual = name.endswith(("attn.proj.weight", "mlp.2.weight"))
        nn.init.normal_(p, std=INIT_STD / (2 * n_layers) ** 0.5 if residual else INIT_STD)
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def step_window_mask(
    n_steps: int, tokens_per_step: int, history: int, device=None
) -> tuple[Tensor, Tensor, Tensor]:
    """The static part of the attention mask for T = n_steps, S = T * P + 1 tokens.

    Returns (allowed, eye, token_step): allowed (S, S) bool is token-causal with a step
    window of h, [ACT] (the last token) counting as part of the last step; eye (S, S) bool;
    token_step (S,) long, each token's step index.
    """
    s = n_steps * tokens_per_step + 1
    idx = torch.arange(s, device=device)
    token_step = (idx // tokens_per_step).clamp_max(n_steps - 1)
    causal = idx[None, :] <= idx[:, None]
    in_window = (token_step[:, None] - token_step[None, :]) < history
    eye = torch.eye(s, dtype=torch.bool, device=device)
    return causal & in_window, eye, token_step


class GR2GPT(nn.Module):
    """Embeds the step layout and runs the masked transformer; returns the [ACT] output."""

    def __init__(self, cfg: GR2Config) -> None:
        super().__init__()
        self.cfg = cfg
        d, n_views, n_tok = cfg.d_model, len(cfg.views), cfg.tokens_per_view
        self.lang_proj = nn.Linear(cfg.text_dim, d)
        self.image_embed = nn.Embedding(cfg.codebook_size, d)
        self.view_embed = nn.Parameter(torch.empty(n_views, 1, d))
        self.pos_embed = nn.Parameter(torch.empty(1, n_tok, d))
        self.state_proj = nn.Linear(ENCODED_STATE_DIM, d)
        self.no_state = nn.Parameter(torch.empty(d))
        self.act_query = nn.Parameter(torch.empty(d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(d)
        init_transformer_(self, cfg.n_layers)
        for p in (self.view_embed, self.pos_embed, self.no_state, self.act_query):
            nn.init.normal_(p, std=INIT_STD)
        # Tables for clips up to 4h steps (training); longer inputs compute theirs on the fly.
        cos, sin = rope_tables(
            4 * cfg.history * cfg.tokens_per_step + 1, d // cfg.n_heads, cfg.rope_base
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._mask_cache: dict[tuple[int, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    def project_language(self, text_embedding: Tensor) -> Tensor:
        """Frozen text embedding (B, text_dim) -> LANG token (B, d_model)."""
        return self.lang_proj(text_embedding)

    def forward(
        self,
        lang: Tensor,
        image_tokens: Tensor,
        states: Tensor,
        state_valid: Tensor,
        step_valid: Tensor,
    ) -> Tensor:
        """[ACT] output (B, d_model).

        lang (B, d_model); image_tokens (B, T, V, N) long; states (B, T, 8) raw (pos m,
        quat wxyz, gripper); state_valid, step_valid (B, T) bool. Oldest step first.
        """
        x = self._embed(lang, image_tokens, states, state_valid, step_valid)
        s = x.shape[1]
        if s <= self.rope_cos.shape[0]:
            rope = (self.rope_cos[:s], self.rope_sin[:s])
        else:
            rope = rope_tables(
                s, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base, x.device
            )
        mask = self._attention_mask(step_valid)
        for block in self.blocks:
            x = block(x, mask, rope)
        return self.norm(x[:, -1])

    def _embed(
        self,
        lang: Tensor,
        image_tokens: Tensor,
        states: Tensor,
        state_valid: Tensor,
        step_valid: Tensor,
    ) -> Tensor:
        """Token embeddings (B, T*P + 1, d_model) in layout order; padding steps are zeroed
        first so that garbage (even NaN) in them cannot reach valid tokens."""
        cfg = self.cfg
        b, t, n_views, n_tok = image_tokens.shape
        p = cfg.tokens_per_step
        valid = step_valid[:, :, None]
        image_tokens = torch.where(valid[..., None], image_tokens, 0)
        states = torch.where(valid, states, 0.0)
        state_in = torch.cat(
            (states[..., :3], quat_to_rot6d(states[..., 3:7]), states[..., 7:8]), -1
        )
        state_emb = torch.where(state_valid[:, :, None], self.state_proj(state_in), self.no_state)
        image_emb = self.image_embed(image_tokens) + self.view_embed + self.pos_embed

        x = lang.new_empty(b, t * p + 1, cfg.d_model)
        steps = x[:, : t * p].view(b, t, p, cfg.d_model)
        steps[:, :, 0] = lang[:, None]
        steps[:, :, 1:-1] = image_emb.reshape(b, t, n_views * n_tok, cfg.d_model)
        steps[:, :, -1] = state_emb
        x[:, -1] = self.act_query
        return x

    def _attention_mask(self, step_valid: Tensor) -> Tensor:
        """Bool (B, 1, S, S): the static window mask AND valid keys, plus the diagonal so a
        padding token's own row is never empty (an empty row would give NaN)."""
        t = step_valid.shape[1]
        key = (t, step_valid.device)
        if key not in self._mask_cache:
            with torch.inference_mode(False):  # cached: must stay usable in training too
                self._mask_cache[key] = step_window_mask(
                    t, self.cfg.tokens_per_step, self.cfg.history, step_valid.device
                )
        static, eye, token_step = self._mask_cache[key]
        key_valid = step_valid[:, token_step]  # (B, S)
        return ((static & key_valid[:, None, :]) | eye)[:, None]
