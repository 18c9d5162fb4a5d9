"""One control step of B episodes as a pure function of explicit tensors.

``GR2Policy.step`` writes into a ``RollingKVCache`` in place. Serving many episodes from one
preallocated pool, and exporting the step to ONNX / TensorRT or capturing it in a CUDA graph,
all want the opposite: the cache as an explicit input and the new keys/values as an output,
no Python-side state, fixed shapes. ``StepFunction`` is that function:

    (past_k, past_v, mask, rope, lang, image_tokens, state) -> (raw_actions, new_k, new_v)

- past_k / past_v (L, B, H, S, Dh): the episode's cached keys/values, S = h*P key slots
  (no [ACT] scratch slot: the new [ACT] attends to itself through the new keys).
- mask (B, 1, P+1, S+P+1) bool and rope (2, B, P+1, Dh/2): built by ``step_layout`` from
  the step index and what each key slot holds. They are inputs, not computed inside,
  because RoPE angles need float64 (which TensorRT lacks) and the mask is data-dependent.
- new_k / new_v (L, B, H, P, Dh): the keys/values of the step's P tokens, which the caller
  writes at slot ``step mod h`` (``step_write_index``).

Attention runs over ``cat(past, new)``: the slot the new step will overwrite holds step
s - h, which the step window already masks, so the result equals the in-place cached step
(to float rounding: the softmax sums in another order). The parity test holds it to 1e-5.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention

from gr2_policy.model.config import GR2Config
from gr2_policy.model.gpt import apply_rope, attention_mask, rope_tables
from gr2_policy.model.policy import GR2Policy, encode_states


def step_layout(
    cfg: GR2Config, step: Tensor, key_step: Tensor, key_pos: Tensor
) -> tuple[Tensor, Tensor]:
    """mask (B, 1, P+1, S+P+1) bool and rope (2, B, P+1, Dh/2) float32 for a step.

    step (B,) long: the episode step each batch item appends; key_step / key_pos (B, S)
    long: what each cached key slot holds (``EMPTY_STEP`` for never written).
    """
    p = cfg.tokens_per_step
    device = step.device
    u = torch.arange(p, device=device)
    q_step = torch.cat((step[:, None].expand(-1, p), step[:, None]), dim=1)  # (B, P+1)
    q_pos = torch.cat(((step * p)[:, None] + u, ((step + 1) * p)[:, None]), dim=1)
    q_act = torch.zeros(p + 1, dtype=torch.bool, device=device)
    q_act[p] = True
    k_act = torch.cat((torch.zeros(key_step.shape[1], dtype=torch.bool, device=device), q_act))
    mask = attention_mask(
        q_step,
        q_pos,
        q_act,
        torch.cat((key_step, q_step), dim=1),
        torch.cat((key_pos, q_pos), dim=1),
        k_act,
        cfg.history,
    )
    rope = rope_tables(q_pos, cfg.d_model // cfg.n_heads, cfg.rope_base, torch.float32)
    return mask, rope


def step_write_index(cfg: GR2Config, step: Tensor) -> Tensor:
    """Key slots (B, P) long that a step's P tokens occupy in a cache of h*P slots."""
    p = cfg.tokens_per_step
    return ((step % cfg.history) * p)[:, None] + torch.arange(p, device=step.device)


def step_key_positions(cfg: GR2Config, step: Tensor) -> Tensor:
    """Token positions (B, P) long of a step's P tokens (what ``key_pos`` records)."""
    p = cfg.tokens_per_step
    return (step * p)[:, None] + torch.arange(p, device=step.device)


class StepFunction(nn.Module):
    """The incremental step of a ``GR2Policy`` with the cache as explicit inputs/outputs.

    Shares the policy's parameters (no copy). Returns the CVAE head's raw output at z = 0
    (B, k, 10); ``GR2Policy.decode_actions`` turns it into absolute waypoints.
    """

    def __init__(self, policy: GR2Policy) -> None:
        super().__init__()
        self.config = policy.config
        self.vqgan = policy.vqgan
        self.gpt = policy.gpt
        self.action_head = policy.action_head

    def forward(
        self,
        past_k: Tensor,
        past_v: Tensor,
        mask: Tensor,
        rope: Tensor,
        lang: Tensor,
        image_tokens: Tensor,
        state: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """past_k/past_v (L, B, H, S, Dh); mask (B, 1, P+1, S+P+1) bool; rope (2, B, P+1,
        Dh/2); lang (B, d) the projected LANG embedding; image_tokens (B, V*N) long; state
        (B, 8) raw -> raw actions (B, k, 10), new_k / new_v (L, B, H, P, Dh)."""
        gpt = self.gpt
        b, d = lang.shape
        heads = self.config.n_heads
        codes = self.vqgan.code_vectors(image_tokens)
        state_emb = gpt.state_proj(encode_states(state))
        x = torch.cat(
            (
                lang[:, None],
                gpt.embed_images(codes, lang),
                state_emb[:, None],
                gpt.act_queries(lang, 1),
            ),
            dim=1,
        )  # (B, P+1, d)
        p = x.shape[1] - 1
        rope = rope.to(x.dtype)
        new_k, new_v = [], []
        for layer, block in enumerate(gpt.blocks):
            attn = block.attn
            h_in = block.norm1(x)
            q, k, v = attn.qkv(h_in).view(b, p + 1, 3, heads, d // heads).unbind(2)
            q = apply_rope(q.transpose(1, 2), rope)
            k = apply_rope(k.transpose(1, 2), rope)
            v = v.transpose(1, 2)
            new_k.append(k[:, :, :p])
            new_v.append(v[:, :, :p])
            keys = torch.cat((past_k[layer].to(k.dtype), k), dim=2)
            values = torch.cat((past_v[layer].to(v.dtype), v), dim=2)
            out = scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + attn.proj(out.transpose(1, 2).reshape(b, p + 1, d))
            x = x + block.mlp(block.norm2(x))
        act = gpt.norm(x[:, p])
        raw = self.action_head.decode(act)
        return raw, torch.stack(new_k), torch.stack(new_v)
