"""CLIP's text tower (OpenAI CLIP / HF ``CLIPTextModelWithProjection``), written for GR-2.

Architecture: token embedding + learned position embedding, pre-LayerNorm blocks (eps
1e-5) with causal multi-head self-attention (biased q/k/v/out projections, kept fused as
one ``qkv`` linear here) and a 4x MLP with quick_gelu, a final LayerNorm, the final hidden
state at the first EOS token, and a bias-free projection to ``embed_dim``.

Pretrained weights come from a local HF directory (``load_clip_text_weights``): config.json
(CLIPTextConfig or a full CLIPConfig), model.safetensors (HF key names; vision keys of a
full CLIPModel file are ignored) and the tokenizer's vocab.json + merges.txt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention

from gr2_policy.errors import CheckpointError
from gr2_policy.model.bpe import CLIPBPETokenizer, TokenizerFileError
from gr2_policy.model.text_encoder import TextEncoder

LAYER_NORM_EPS = 1e-5
MLP_RATIO = 4
HIDDEN_ACT = "quick_gelu"
# HF configs written before transformers PR #24773 say eos_token_id 2; HF then pools at
# the largest id, which for CLIP's vocabulary is <|endoftext|> (the last id) anyway.
LEGACY_EOS_TOKEN_ID = 2
# CLIPTextConfig's defaults, used for fields a config.json leaves out (as HF does).
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": HIDDEN_ACT,
    "layer_norm_eps": LAYER_NORM_EPS,
}


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention; q, k, v projections fused into one linear."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, S, width) -> (B, S, width)."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        out = scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(out.transpose(1, 2).reshape(b, s, d))


class CLIPMLP(nn.Module):
    """fc1 -> quick_gelu -> fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = CLIPAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(width, MLP_RATIO * width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPTextEncoder(TextEncoder):
    """CLIP text transformer + projection; ``encode`` needs a tokenizer to be loaded.

    Freshly built, it has CLIP's random init and no tokenizer: load a pretrained tower with
    ``load_clip_text_weights`` or, from a GR-2 checkpoint, the weights through the
    checkpoint and the tokenizer with ``load_tokenizer``.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        max_len: int,
        embed_dim: int,
    ) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (BOS + EOS), got {max_len}")
        self.vocab_size, self.width, self.layers, self.heads = vocab_size, width, layers, heads
        self.max_len, self.embed_dim = max_len, embed_dim
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(max_len, width))
        self.blocks = nn.ModuleList(CLIPBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.tokenizer: CLIPBPETokenizer | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        """OpenAI CLIP's init: residual-branch outputs scaled down by sqrt(2 * layers)."""
        std = self.width**-0.5
        out_std = std * (2 * max(self.layers, 1)) ** -0.5
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.attn.out.weight, std=out_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=out_std)
            for linear in (block.attn.qkv, block.attn.out, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.proj.weight, std=std)

    @property
    def dim(self) -> int:
        return self.embed_dim

    # -- tokenizer -----------------------------------------------------------------------

    def set_tokenizer(self, tokenizer: CLIPBPETokenizer) -> None:
        """Use ``tokenizer``; CheckpointError if its ids do not fit the embedding table."""
        _check_tokenizer(self, tokenizer, "the tokenizer")
        self.tokenizer = tokenizer

    def save_tokenizer(self, directory: Path) -> None:
        """Write vocab.json + merges.txt into ``directory``."""
        if self.tokenizer is None:
            raise RuntimeError(_NO_TOKENIZER)
        self.tokenizer.save(Path(directory))

    def load_tokenizer(self, directory: Path) -> None:
        """Read vocab.json + merges.txt from ``directory``; CheckpointError if unusable."""
        directory = Path(directory)
        self.set_tokenizer(_read_tokenizer(directory, f"tokenizer directory {directory}"))

    # -- forward -------------------------------------------------------------------------

    def embed_ids(self, ids: Tensor, eos_positions: Tensor) -> Tensor:
        """ids (B, S <= max_len) long, eos_positions (B,) long -> pooled (B, embed_dim).

        Attention is causal, so only the first ``max(eos_positions) + 1`` tokens are run:
        later ones (padding) cannot change the states at the EOS positions.
        """
        device = self.token_embed.weight.device
        ids, eos_positions = ids.to(device), eos_positions.to(device)
        seq_len = int(eos_positions.max()) + 1
        x = self.token_embed(ids[:, :seq_len]) + self.pos_embed[:seq_len]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[torch.arange(x.shape[0], device=device), eos_positions]
        return self.proj(pooled)

    def encode(self, texts: list[str]) -> Tensor:
        """texts (B strings) -> (B, embed_dim): the projected state at each text's EOS."""
        if self.tokenizer is None:
            raise RuntimeError(_NO_TOKENIZER)
        if not texts:
            return self.proj.weight.new_zeros(0, self.embed_dim)
        ids, eos_positions = self.tokenizer.encode_batch(texts, self.max_len)
        return self.embed_ids(ids, eos_positions)


_NO_TOKENIZER = (
    "the CLIP text encoder has no tokenizer: load vocab.json and merges.txt with "
    "CLIPTextEncoder.load_tokenizer(directory) or load_clip_text_weights(encoder, directory)"
)


def _read_tokenizer(directory: Path, where: str) -> CLIPBPETokenizer:
    try:
        return CLIPBPETokenizer.from_directory(directory)
    except TokenizerFileError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def _check_tokenizer(encoder: CLIPTextEncoder, tokenizer: CLIPBPETokenizer, where: str) -> None:
    if tokenizer.vocab_size > encoder.vocab_size:
        raise CheckpointError(
            f"{where}: vocab.json has ids up to {tokenizer.vocab_size - 1} but the model "
            f"config expects text_vocab_size {encoder.vocab_size}"
        )


# -- loading HF weights ------------------------------------------------------------------


def read_clip_text_config(directory: Path) -> dict[str, Any]:
    """The text tower's fields from ``directory/config.json``, HF defaults filled in.

    Accepts a CLIPTextConfig or a full CLIPConfig (``text_config``, plus the legacy
    ``text_config_dict`` overrides); a full config's projection width is its top-level
    ``projection_dim`` (the one CLIPModel uses). ``eos_token_id`` is None when absent.
    """
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"CLIP directory {directory}: config.json is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"CLIP directory {directory}: config.json is not JSON: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"CLIP directory {directory}: config.json must be an object")
    if "text_config" in data or data.get("model_type") == "clip":
        text = {**(data.get("text_config") or {}), **(data.get("text_config_dict") or {})}
        text["projection_dim"] = data.get("projection_dim", HF_TEXT_DEFAULTS["projection_dim"])
    else:
        text = data
    fields = {name: text.get(name, default) for name, default in HF_TEXT_DEFAULTS.items()}
    fields["eos_token_id"] = text.get("eos_token_id")
    return fields


def _check_config(encoder: CLIPTextEncoder, fields: dict[str, Any], directory: Path) -> None:
    where = f"CLIP directory {directory}"
    expected = (
        ("vocab_size", encoder.vocab_size, "text_vocab_size"),
        ("hidden_size", encoder.width, "text_dim"),
        ("num_hidden_layers", encoder.layers, "text_layers"),
        ("num_attention_heads", encoder.heads, "text_heads"),
        ("max_position_embeddings", encoder.max_len, "text_max_len"),
        ("projection_dim", encoder.embed_dim, "text_embed_dim"),
        ("intermediate_size", MLP_RATIO * encoder.width, f"{MLP_RATIO} * text_dim ="),
    )
    for hf_name, want, our_name in expected:
        if fields[hf_name] != want:
            raise CheckpointError(
                f"{where}: {hf_name} is {fields[hf_name]!r} but the model config expects "
                f"{our_name} {want}"
            )
    if fields["hidden_act"] != HIDDEN_ACT:
        raise CheckpointError(
            f"{where}: hidden_act is {fields['hidden_act']!r} but the CLIP text encoder "
            f"supports only {HIDDEN_ACT!r}"
        )
    eps = fields["layer_norm_eps"]
    if not isinstance(eps, int | float) or abs(eps - LAYER_NORM_EPS) > 1e-12:
        raise CheckpointError(
            f"{where}: layer_norm_eps is {eps!r} but the CLIP text encoder uses {LAYER_NORM_EPS}"
        )


def _check_eos(fields: dict[str, Any], tokenizer: CLIPBPETokenizer, directory: Path) -> None:
    """Pooling uses the tokenizer's <|endoftext|> id; a config must not say otherwise.

    An absent eos_token_id, or the legacy 2, means "the tokenizer's <|endoftext|>".
    """
    eos = fields["eos_token_id"]
    allowed = eos if isinstance(eos, list) else [eos]
    if eos is None or LEGACY_EOS_TOKEN_ID in allowed or tokenizer.eos_id in allowed:
        return
    raise CheckpointError(
        f"CLIP directory {directory}: eos_token_id is {eos!r} but vocab.json's "
        f"<|endoftext|> id is {tokenizer.eos_id}"
    )


def hf_key_map(layers: int) -> dict[str, list[str]]:
    """Our parameter name -> the HF key(s) it is made of (q, k, v are concatenated)."""
    mapping = {
        "token_embed.weight": ["text_model.embeddings.token_embedding.weight"],
        "pos_embed": ["text_model.embeddings.position_embedding.weight"],
        "norm.weight": ["text_model.final_layer_norm.weight"],
        "norm.bias": ["text_model.final_layer_norm.bias"],
        "proj.weight": ["text_projection.weight"],
    }
    for i in range(layers):
        ours, hf = f"blocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            mapping[ours + f"attn.qkv.{kind}"] = [
                hf + f"self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")
            ]
            for our_mod, hf_mod in (
                ("attn.out", "self_attn.out_proj"),
                ("norm1", "layer_norm1"),
                ("norm2", "layer_norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                mapping[ours + f"{our_mod}.{kind}"] = [hf + f"{hf_mod}.{kind}"]
    return mapping


def _read_weights(encoder: CLIPTextEncoder, directory: Path) -> dict[str, Tensor]:
    """Our state dict from ``model.safetensors``, every tensor present and shaped right."""
    where = f"CLIP directory {directory}"
    path = directory / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{where}: model.safetensors is missing")
    shapes = {name: p.shape for name, p in encoder.named_parameters()}
    state: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for ours, hf_keys in hf_key_map(encoder.layers).items():
                missing = [k for k in hf_keys if k not in keys]
                if missing:
                    raise CheckpointError(f"{where}: model.safetensors has no tensor {missing[0]}")
                tensors = [f.get_tensor(k) for k in hf_keys]
                tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
                if tensor.shape != shapes[ours]:
                    shape = "+".join(str(tuple(t.shape)) for t in tensors)
                    raise CheckpointError(
                        f"{where}: {' + '.join(hf_keys)} has shape {shape} but the model "
                        f"config needs {tuple(shapes[ours])}"
                    )
                state[ours] = tensor
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{where}: model.safetensors is unreadable: {exc}") from exc
    return state


def load_clip_text_weights(encoder: CLIPTextEncoder, directory: str | Path) -> None:
    """Load a pretrained CLIP text tower and its tokenizer from a local HF directory.

    Everything is validated before the encoder changes: any missing file or tensor, or a
    config field that disagrees with how ``encoder`` was built, raises CheckpointError.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"CLIP directory {directory} does not exist")
    fields = read_clip_text_config(directory)
    _check_config(encoder, fields, directory)
    tokenizer = _read_tokenizer(directory, f"CLIP directory {directory}")
    _check_tokenizer(encoder, tokenizer, f"CLIP directory {directory}")
    _check_eos(fields, tokenizer, directory)
    state = _read_weights(encoder, directory)
    with torch.no_grad():
        encoder.load_state_dict(state, strict=True)
    encoder.tokenizer = tokenizer
