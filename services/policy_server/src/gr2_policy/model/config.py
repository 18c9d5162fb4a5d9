"""GR-2 model configuration: one frozen dataclass and a table of named presets.

The config is saved next to the weights as JSON (``to_dict``) and read back strictly
(``from_dict``): unknown or missing fields are errors, so a checkpoint never loads with a
silently different architecture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Raw robot state per step: position (3, m) + quaternion (4, wxyz) + gripper (1, 0..1).
RAW_STATE_DIM = 8
# Encoded state / action per step: position (3) + 6-D rotation (6) + gripper (1).
ENCODED_STATE_DIM = 10
TEXT_ENCODERS = ("byte", "clip", "words")
# Fields added after checkpoints were first written, each with the value that means the
# architecture before it: a config.json without them still loads, as that architecture.
ADDED_FIELDS: dict[str, Any] = {"lang_to_tokens": False}


@dataclass(frozen=True)
class GR2Config:
    """Architecture and I/O contract of one GR-2 model (defaults are gr2-tiny)."""

    preset: str = "gr2-tiny"
    # Cameras and the frozen VQ image tokenizer.
    views: tuple[str, ...] = ("head", "wrist")
    image_size: int = 64  # square images, pixels
    vq_downsample: int = 8  # f: image_size / f tokens per side
    codebook_size: int = 512
    codebook_dim: int = 64
    vq_channels: int = 32  # width of the first VQ conv stage
    # Width multiplier per resolution level, one per level: log2(vq_downsample) + 1 entries.
    vq_channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    vq_res_blocks: int = 1  # residual blocks per level (the decoder has one more)
    vq_attention: bool = True  # a self-attention block at the lowest resolution
    # The GPT backbone (trainable).
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    history: int = 4  # h: steps attended to
    # Actions.
    action_horizon: int = 10  # k: waypoints per chunk
    waypoint_dt_s: float = 0.1  # seconds between waypoints
    state_dim: int = RAW_STATE_DIM
    latent_dim: int = 32  # CVAE latent
    action_head_dim: int = 128
    action_head_layers: int = 2
    action_head_heads: int = 4
    action_position_scale_m: float = 0.1  # metres per unit of raw position output
    # Add learned projections of [LANG] to every image token's embedding and to the [ACT]
    # query, so that finding what the instruction names takes one attention hop, not two
    # (see GR2GPT.embed_images and GR2GPT.act_queries).
    lang_to_tokens: bool = False
    # The frozen text encoder: "byte" (built-in byte-level transformer), "words" (a fixed
    # random vector per word, no weights) or "clip" (CLIP's text tower, weights loaded from a
    # local directory).
    text_encoder: str = "byte"
    text_max_len: int = 64  # tokens, including BOS (and EOS for clip)
    text_dim: int = 128  # transformer width
    text_layers: int = 2
    text_heads: int = 4
    text_vocab_size: int = 258  # byte: 256 bytes + PAD + BOS; clip: the BPE vocabulary
    text_embed_dim: int = 128  # pooled output width (CLIP's text_projection)

    def __post_init__(self) -> None:
        for name in ("views", "vq_channel_mult"):  # JSON gives lists; keep it hashable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if not self.views or len(set(self.views)) != len(self.views):
            problems.append(f"views must be distinct and non-empty, got {self.views}")
        f = self.vq_downsample
        if f < 2 or f & (f - 1) or self.image_size % f:
            problems.append(
                f"vq_downsample ({f}) must be a power of two dividing image_size "
                f"({self.image_size})"
            )
        elif len(self.vq_channel_mult) != f.bit_length():
            problems.append(
                f"vq_channel_mult needs log2(vq_downsample) + 1 = {f.bit_length()} entries, "
                f"got {len(self.vq_channel_mult)}"
            )
        if self.text_encoder not in TEXT_ENCODERS:
            problems.append(
                f"text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}"
            )
        elif self.text_encoder == "byte" and (
            self.text_vocab_size != 258 or self.text_embed_dim != self.text_dim
        ):
            problems.append(
                "the byte text encoder needs text_vocab_size 258, text_embed_dim = text_dim"
            )
        elif self.text_encoder == "words" and self.text_embed_dim != self.text_dim:
            problems.append("the words text encoder needs text_embed_dim = text_dim")
        for dim, heads, name in (
            (self.d_model, self.n_heads, "d_model"),
            (self.text_dim, self.text_heads, "text_dim"),
            (self.action_head_dim, self.action_head_heads, "action_head_dim"),
        ):
            if heads < 1 or dim % heads:
                problems.append(f"{name} ({dim}) must be divisible by its head count ({heads})")
        if self.n_heads >= 1 and (self.d_model // self.n_heads) % 2:
            problems.append("d_model / n_heads must be even for RoPE")
        if self.state_dim != RAW_STATE_DIM:
            problems.append(f"state_dim must be {RAW_STATE_DIM} (pos3 + quat4 + gripper1)")
        for name in (
            "history",
            "action_horizon",
            "n_layers",
            "codebook_size",
            "text_max_len",
            "vq_res_blocks",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.waypoint_dt_s <= 0 or self.action_position_scale_m <= 0:
            problems.append("waypoint_dt_s and action_position_scale_m must be > 0")
        if problems:
            raise ValueError("invalid GR2Config: " + "; ".join(problems))

    @property
    def tokens_per_side(self) -> int:
        """Image tokens along one side of a view."""
        return self.image_size // self.vq_downsample

    @property
    def tokens_per_view(self) -> int:
        """N: image tokens per view, (image_size / vq_downsample) ** 2."""
        return self.tokens_per_side**2

    @property
    def tokens_per_step(self) -> int:
        """P: tokens per timestep, [LANG] + V*N image tokens + [STATE]."""
        return 2 + len(self.views) * self.tokens_per_view

    @property
    def image_tokens_per_step(self) -> int:
        """V*N: image tokens per timestep, all views."""
        return len(self.views) * self.tokens_per_view

    @property
    def receptive_field(self) -> int:
        """R = L(h-1)+1: steps a step's output depends on through L windowed layers."""
        return self.n_layers * (self.history - 1) + 1

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GR2Config:
        """The named preset (``gr2-tiny``, ``gr2-small``, ``gr2-base``) with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field."""
        out = dataclasses.asdict(self)
        out["views"] = list(self.views)
        out["vq_channel_mult"] = list(self.vq_channel_mult)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GR2Config:
        """Strict inverse of ``to_dict``: unknown or missing fields raise ValueError (a
        missing field of ``ADDED_FIELDS`` takes its old-architecture value)."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        data = {**{k: v for k, v in ADDED_FIELDS.items() if k not in data}, **data}
        missing = sorted(names - set(data))
        if unknown:
            raise ValueError(f"unknown config field(s): {unknown}")
        if missing:
            raise ValueError(f"missing config field(s): {missing}")
        return cls(**data)


# Per-preset fields; anything not listed takes the dataclass default (the gr2-tiny value).
PRESETS: dict[str, dict[str, Any]] = {
    "gr2-tiny": {},
    "gr2-small": {
        "codebook_size": 1024,
        "codebook_dim": 128,
        "vq_channels": 64,
        "vq_res_blocks": 2,
        "d_model": 384,
        "n_layers": 6,
        "n_heads": 6,
        "action_head_dim": 192,
        "action_head_heads": 4,
        "text_max_len": 77,
        "text_dim": 256,
        "text_layers": 4,
        "text_embed_dim": 256,
    },
    "gr2-base": {
        "image_size": 256,
        "vq_downsample": 16,
        "codebook_size": 8192,
        "codebook_dim": 256,
        "vq_channels": 128,
        "vq_channel_mult": (1, 1, 2, 2, 4),
        "vq_res_blocks": 2,
        "d_model": 768,
        "n_layers": 12,
        "n_heads": 12,
        "history": 10,
        "action_head_dim": 256,
        "action_head_heads": 4,
        # CLIP ViT-B/32's text tower (openai/clip-vit-base-patch32).
        "text_encoder": "clip",
        "text_max_len": 77,
        "text_dim": 512,
        "text_layers": 12,
        "text_heads": 8,
        "text_vocab_size": 49408,
        "text_embed_dim": 512,
    },
}
