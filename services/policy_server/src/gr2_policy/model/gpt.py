"""The GR-2 GPT backbone: step layout, step-level sliding-window attention, RoPE, KV cache.

Token layout per timestep (P = 2 + V*N tokens, in-step index u)::

    u = 0: [LANG]   u = 1 .. V*N: image tokens, view by view   u = V*N + 1: [STATE]

plus, for the steps whose action is wanted, an [ACT] query token. Every token carries its
step s and its position (s*P + u; [ACT] of step s sits at s*P + P). The one attention rule,
used by the full forward and by the cached forward alike::

    query i may attend key j  iff  step_j <= step_i  and  step_i - step_j < h
                                   and pos_j <= pos_i
                                   and (j is not an [ACT], or j is i's own [ACT])

so attention is causal inside a step, each step sees the steps t-h+1..t (a step-level
sliding window), and no token attends to an [ACT]. Positions enter only through RoPE on
the token index (scores depend only on offsets), computed in float64 so that positions far
into a long episode stay exact.

Through L layers a step's output depends on the last R = L(h-1)+1 steps. The cached
forward keeps, per layer, the keys/values of the last h steps in a rolling buffer
(``RollingKVCache``), which makes an incremental step exactly a forward over the whole
episode, or over its last R steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention

from gr2_policy.model.config import ENCODED_STATE_DIM, GR2Config
from gr2_policy.model.kv_cache import RollingKVCache

INIT_STD = 0.02


def rope_tables(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> Tensor:
    """cos and sin for integer ``positions`` (..., S): stacked (2, ..., S, head_dim / 2).

    The angles are computed in float64: in float32, position * frequency loses ~0.1 rad at
    position 1e6, which a long episode reaches.
    """
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    )
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return torch.stack((angles.cos(), angles.sin())).to(dtype)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate query/key pairs: x (B, H, S, D); rope (2, B or 1, S, D/2) from ``rope_tables``."""
    cos, sin = rope[0][:, None], rope[1][:, None]  # (B, 1, S, D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attention_mask(
    q_step: Tensor,
    q_pos: Tensor,
    q_act: Tensor,
    k_step: Tensor,
    k_pos: Tensor,
    k_act: Tensor,
    history: int,
) -> Tensor:
    """The attention rule of the module docstring as a bool mask (B, 1, Sq, Sk), True =
    may attend. Steps/positions (B, S) long (B may be 1); act flags (S,) bool."""
    qs, qp = q_step[:, :, None], q_pos[:, :, None]
    ks, kp = k_step[:, None, :], k_pos[:, None, :]
    allowed = (ks <= qs) & (qs - ks < history) & (kp <= qp)
    own_act = q_act[:, None] & (ks == qs)  # [ACT] keys: only the same step's [ACT] query
    allowed = allowed & (~k_act[None, None, :] | own_act)
    return allowed[:, None]


class Attention(nn.Module):
    """Multi-head self-attention with RoPE and an explicit mask, optionally through a cache."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        rope: Tensor | None = None,
        cache: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x (B, S, dim); mask bool (B or 1, 1, S, Sk), True = may attend.

        cache: (k_buffer, v_buffer, write_index) with buffers (B, H, Sk, head_dim) and
        write_index (B, S) long: the new keys/values are written at those key slots, then
        the queries attend over the whole buffer.
        """
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k_buffer, v_buffer, write_index = cache
            rows = torch.arange(b, device=x.device)[:, None]
            k_buffer[rows, :, write_index] = k.transpose(1, 2)
            v_buffer[rows, :, write_index] = v.transpose(1, 2)
            k, v = k_buffer, v_buffer
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
        self,
        x: Tensor,
        mask: Tensor | None = None,
        rope: Tensor | None = None,
        cache: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> Tensor:
        """x (B, S, dim) -> (B, S, dim)."""
        x = x + self.attn(self.norm1(x), mask, rope, cache)
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


@dataclass(frozen=True)
class GPTOutput:
    """hidden (B, T, P, d_model) after the final norm; act (B, T_act, d_model) the [ACT]
    outputs of the requested steps (T_act = 0 when none were asked for)."""

    hidden: Tensor
    act: Tensor


class GR2GPT(nn.Module):
    """Embeds the step layout, runs the windowed transformer, predicts image tokens."""

    def __init__(self, cfg: GR2Config) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.lang_proj = nn.Linear(cfg.text_embed_dim, d)
        # Image tokens enter as a trainable projection of the frozen (l2-normalised) VQ code
        # vectors, plus view and in-view position embeddings.
        self.image_in = nn.Linear(cfg.codebook_dim, d)
        # Optional (cfg.lang_to_tokens): [LANG] projected onto every image token and onto the
        # [ACT] query; zero at init, so the model starts as the unconditioned one.
        self.image_lang = nn.Linear(d, d) if cfg.lang_to_tokens else None
        self.act_lang = nn.Linear(d, d) if cfg.lang_to_tokens else None
        self.view_embed = nn.Parameter(torch.empty(len(cfg.views), d))
        self.pos_embed = nn.Parameter(torch.empty(cfg.tokens_per_view, d))
        self.state_proj = nn.Linear(ENCODED_STATE_DIM, d)
        self.no_state = nn.Parameter(torch.empty(d))
        self.act_query = nn.Parameter(torch.empty(d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.image_head = nn.Linear(d, cfg.codebook_size, bias=False)  # next image token
        init_transformer_(self, cfg.n_layers)
        for p in (self.view_embed, self.pos_embed, self.no_state, self.act_query):
            nn.init.normal_(p, std=INIT_STD)
        for projection in (self.image_lang, self.act_lang):
            if projection is not None:
                nn.init.zeros_(projection.weight)
        self._mask_cache: dict[tuple, Tensor] = {}

    # -- embeddings --------------------------------------------------------------------

    def project_language(self, text_embedding: Tensor) -> Tensor:
        """Frozen text embedding (B, text_embed_dim) -> LANG token (B, d_model)."""
        return self.lang_proj(text_embedding)

    def embed_images(self, code_vectors: Tensor, lang: Tensor, start: int = 0) -> Tensor:
        """Code vectors (B, ..., S, codebook_dim) of the image tokens at in-step image indices
        start..start+S-1 (0 = first token of the first view) -> embeddings (B, ..., S, d).

        With ``cfg.lang_to_tokens`` each token also gets ``image_lang(lang)`` (lang: the
        LANG embedding (B, d)), so its own MLP can tell whether it is what the instruction
        names (see ``act_queries`` for the other half).
        """
        s, n = code_vectors.shape[-2], self.cfg.tokens_per_view
        index = torch.arange(start, start + s, device=code_vectors.device)
        out = self.image_in(code_vectors) + self.view_embed[index // n] + self.pos_embed[index % n]
        if self.image_lang is not None:
            cond = self.image_lang(lang)
            out = out + cond.view(cond.shape[0], *([1] * (out.dim() - 2)), cond.shape[-1])
        return out

    def act_queries(self, lang: Tensor, n: int) -> Tensor:
        """The [ACT] query tokens (B, n, d) of n steps whose [LANG] embedding is lang (B, d).

        Without ``cfg.lang_to_tokens`` it is one learned vector. With it, it is that vector
        plus ``act_lang(lang)``: then the very first attention score of [ACT] against an
        image token is bilinear in (instruction, image code), and "where is the red block"
        is one hop. Without it, [ACT] must first read the colour from [LANG] and only in a
        later layer search the image for it; a small model trained from scratch on this
        two-hop circuit sat at chance grounding for thousands of steps (README, "The demo
        model").
        """
        query = self.act_query.expand(lang.shape[0], n, -1)
        if self.act_lang is None:
            return query
        return query + self.act_lang(lang)[:, None]

    def embed_state(self, state_encoded: Tensor, state_valid: Tensor) -> Tensor:
        """Encoded states (..., 10) and validity (...) bool -> STATE tokens (..., d); an
        invalid state (video-only data, imagined steps) is the learned "no state" token."""
        valid = state_valid[..., None]
        state_encoded = torch.where(valid, state_encoded, 0.0)  # NaN in a hole cannot leak
        return torch.where(valid, self.state_proj(state_encoded), self.no_state)

    def assemble_steps(self, lang: Tensor, image_emb: Tensor, state_emb: Tensor) -> Tensor:
        """lang (B, d), image_emb (B, T, V*N, d), state_emb (B, T, d) -> (B, T, P, d)."""
        b, t = state_emb.shape[:2]
        return torch.cat(
            (lang[:, None, None].expand(b, t, 1, -1), image_emb, state_emb[:, :, None]), dim=2
        )

    def image_logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states (..., d) -> next image token logits (..., codebook_size)."""
        return self.image_head(hidden)

    # -- full forward ------------------------------------------------------------------

    def forward(self, steps: Tensor, first_step: int = 0, act_steps: str = "last") -> GPTOutput:
        """Masked forward over T whole steps.

        steps (B, T, P, d) from ``assemble_steps``; first_step: the episode step index of
        steps[:, 0] (positions are absolute, so any window of an episode gives the
        same scores as the whole episode); act_steps: "all" (an [ACT] per step: training),
        "last" (only the last step's: inference) or "none" (video only).
        """
        b, t, p, d = steps.shape
        if act_steps not in ("all", "last", "none"):
            raise ValueError(f"act_steps must be 'all', 'last' or 'none', got {act_steps!r}")
        act_at = {"all": list(range(t)), "last": [t - 1], "none": []}[act_steps]
        x = steps.reshape(b, t * p, d)
        if act_at:  # every step's [LANG] (in-step index 0) is the episode's instruction
            x = torch.cat((x, self.act_queries(steps[:, 0, 0], len(act_at))), dim=1)
        step_ids, pos_ids, is_act = self._layout(t, first_step, tuple(act_at), x.device)
        mask = self._full_mask(t, tuple(act_at), x.device, step_ids, pos_ids, is_act)
        rope = rope_tables(pos_ids, d // self.cfg.n_heads, self.cfg.rope_base, x.dtype)
        for block in self.blocks:
            x = block(x, mask, rope)
        x = self.norm(x)
        return GPTOutput(hidden=x[:, : t * p].view(b, t, p, d), act=x[:, t * p :])

    def _layout(
        self, t: int, first_step: int, act_at: tuple[int, ...], device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per token: step (1, S), position (1, S), is-[ACT] (S,) for T steps + [ACT]s."""
        p = self.cfg.tokens_per_step
        local = torch.arange(t * p, device=device)
        act_steps = torch.tensor(act_at, dtype=torch.long, device=device)
        step_ids = torch.cat((local // p, act_steps)) + first_step
        pos_ids = torch.cat((local + first_step * p, (act_steps + first_step + 1) * p))
        is_act = torch.arange(step_ids.numel(), device=device) >= t * p
        return step_ids[None], pos_ids[None], is_act

    def _full_mask(self, t, act_at, device, step_ids, pos_ids, is_act) -> Tensor:
        """The (1, 1, S, S) mask; it depends only on relative steps, so it is cached."""
        key = (t, act_at, device)
        if key not in self._mask_cache:
            with torch.inference_mode(False):  # must stay usable in training too
                self._mask_cache[key] = attention_mask(
                    step_ids, pos_ids, is_act, step_ids, pos_ids, is_act, self.cfg.history
                )
        return self._mask_cache[key]

    # -- cached forward ----------------------------------------------------------------

    def forward_cached(
        self, x: Tensor, cache: RollingKVCache, step: Tensor, start: int, with_act: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Append S tokens of ``step`` (B,) at in-step indices start..start+S-1 to the cache
        and run them, attending to the cached window; returns (hidden (B, S, d), the [ACT]
        output (B, d) or None). With ``with_act`` an [ACT] query of ``step`` follows the
        tokens; its key/value go to the cache's scratch slot, which only it can see.
        """
        s, d = x.shape[1:]
        if with_act:  # the [ACT] query needs the step's [LANG]: x must start with it
            if start != 0:
                raise ValueError("an [ACT] query needs the whole step, from [LANG] (start 0)")
            x = torch.cat((x, self.act_queries(x[:, 0], 1)), dim=1)
        write_index, q_step, q_pos, q_act = cache.claim(step, start, s, with_act)
        mask = attention_mask(
            q_step, q_pos, q_act, cache.key_step, cache.key_pos, cache.key_act, self.cfg.history
        )
        rope = rope_tables(q_pos, d // self.cfg.n_heads, self.cfg.rope_base, x.dtype)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, rope, (cache.k[layer], cache.v[layer], write_index))
        x = self.norm(x)
        return (x[:, :s], x[:, s]) if with_act else (x, None)
