"""VQGAN image tokenizer: encoder, codebook and decoder (taming-transformers layout).

Images (B, H, W, 3) uint8 -> token ids (B, N) with N = (H / f) ** 2 in row-major order, and
back to pixels. Latents and codes are l2-normalised and matched by cosine similarity (as in
ViT-VQGAN), which keeps the codebook well used, also at random initialisation.

The discriminator and the perceptual (LPIPS) loss are training-time parts and live with the
tokenizer training stage; this module only carries what inference and the plain VQ losses
need. The policy freezes it (``requires_grad_(False)``, eval mode); on its own it trains
normally through ``forward`` / ``training_losses``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from gr2_policy.model.config import GR2Config

# Weight of the commitment loss (the VQ-VAE paper's beta): pulls encoder outputs towards
# their codes, four times weaker than the codebook loss pulls codes towards the outputs.
COMMITMENT_BETA = 0.25


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest group count below 32 dividing ``channels``."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """(GroupNorm-SiLU-conv3x3) twice plus a shortcut (1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut: nn.Module = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x (B, c_in, H, W) -> (B, c_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> same shape."""
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, positions as the sequence.
        q, k, v = (
            conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 conv3x3: halves H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then conv3x3: doubles H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _stage(c_in: int, c_out: int, blocks: int, attention: bool) -> tuple[nn.ModuleList, int]:
    """``blocks`` res blocks c_in -> c_out, each followed by attention when asked."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers.append(ResnetBlock(c_in, c_out))
        c_in = c_out
        if attention:
            layers.append(AttnBlock(c_out))
    return nn.ModuleList(layers), c_out


def _mid(channels: int, attention: bool) -> nn.Sequential:
    """The bottleneck: res, attention (optional), res."""
    attn: nn.Module = AttnBlock(channels) if attention else nn.Identity()
    return nn.Sequential(ResnetBlock(channels, channels), attn, ResnetBlock(channels, channels))


class Encoder(nn.Module):
    """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, D, H/f, W/f), before quant_conv."""

    def __init__(self, cfg: GR2Config) -> None:
        super().__init__()
        widths = [cfg.vq_channels * m for m in cfg.vq_channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        c = widths[0]
        for i, width in enumerate(widths):
            blocks, c = _stage(c, width, cfg.vq_res_blocks, cfg.vq_attention and i == last)
            if i != last:
                blocks.append(Downsample(c))
            self.levels.append(blocks)
        self.mid = _mid(c, cfg.vq_attention)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> (B, D, H/f, W/f)."""
        h = self.conv_in(x)
        for level in self.levels:
            for layer in level:
                h = layer(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, D, H/f, W/f), after post_quant_conv -> pixels (B, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg: GR2Config) -> None:
        super().__init__()
        widths = [cfg.vq_channels * m for m in cfg.vq_channel_mult]
        last = len(widths) - 1
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.codebook_dim, c, 3, padding=1)
        self.mid = _mid(c, cfg.vq_attention)
        self.levels = nn.ModuleList()  # lowest resolution first
        for i in range(last, -1, -1):
            blocks, c = _stage(c, widths[i], cfg.vq_res_blocks + 1, cfg.vq_attention and i == last)
            if i != 0:
                blocks.append(Upsample(c))
            self.levels.append(blocks)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """z (B, D, h, w) -> (B, 3, h*f, w*f) in [-1, 1]."""
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            for layer in level:
                h = layer(h)
        return torch.tanh(self.conv_out(F.silu(self.norm_out(h))))


@dataclass
class VQOutput:
    """One training forward pass of the tokenizer.

    reconstruction (B, 3, H, W) in [-1, 1]; ids (B, N) long; code_vectors (B, N, D): what
    the decoder saw (the codes, with the encoder's gradient passed straight through);
    codebook_loss and commitment_loss are scalars (unweighted).
    """

    reconstruction: Tensor
    ids: Tensor
    code_vectors: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor


class VQGAN(nn.Module):
    """Encoder (downsampling by f), codebook (K x D, cosine lookup), decoder (upsampling by f).

    Inference: ``encode`` (uint8 images -> ids), ``decode`` (ids -> uint8 images) and
    ``code_vectors`` (ids -> l2-normalised code vectors, what the decoder sees).
    Training: ``forward`` / ``training_losses`` on float images in [-1, 1].
    """

    def __init__(self, cfg: GR2Config) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.side = cfg.tokens_per_side
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.codebook_dim, 1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        nn.init.normal_(self.codebook.weight)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.codebook_dim, 1)
        self.decoder = Decoder(cfg)

    # -- inference ------------------------------------------------------------------------

    def encode(self, images: Tensor) -> Tensor:
        """uint8 (B, H, W, 3) RGB -> token ids (B, N) long, row-major over the token grid."""
        if images.dtype != torch.uint8 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected uint8 images (B, {self.image_size}, {self.image_size}, 3), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        x = images.permute(0, 3, 1, 2).to(self.codebook.weight.dtype) / 127.5 - 1.0
        return self.quantize(self._latents(x))

    def quantize(self, z: Tensor) -> Tensor:
        """Latents (B, N, D) -> ids (B, N) of the most similar codes (cosine similarity)."""
        codes = F.normalize(self.codebook.weight, dim=-1)
        return (F.normalize(z, dim=-1) @ codes.T).argmax(dim=-1)

    def code_vectors(self, ids: Tensor) -> Tensor:
        """Token ids (...) long -> their l2-normalised code vectors (..., D)."""
        return F.normalize(self.codebook(ids), dim=-1)

    def decode(self, ids: Tensor) -> Tensor:
        """Token ids (B, N) long -> uint8 images (B, H, W, 3)."""
        x = self._reconstruct(self.code_vectors(ids))
        pixels = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1)

    # -- training -------------------------------------------------------------------------

    def forward(self, x: Tensor) -> VQOutput:
        """Float images (B, 3, H, W) in [-1, 1] -> reconstruction, ids and the VQ losses.

        Quantisation uses the straight-through estimator on l2-normalised latents and codes:
        the decoder sees the code, the encoder gets the decoder's gradient as if it had
        seen the latent. The codebook learns from ``codebook_loss``, the encoder is held to
        its codes by ``commitment_loss``.
        """
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s) or not x.is_floating_point():
            raise ValueError(
                f"expected float images (B, 3, {s}, {s}), got {x.dtype} {tuple(x.shape)}"
            )
        z = F.normalize(self._latents(x), dim=-1)  # (B, N, D)
        codes = F.normalize(self.codebook.weight, dim=-1)
        ids = (z.detach() @ codes.detach().T).argmax(dim=-1)
        z_q = F.embedding(ids, codes)  # differentiable w.r.t. the codebook
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()
        return VQOutput(self._reconstruct(z_st), ids, z_st, codebook_loss, commitment_loss)

    def training_losses(self, x: Tensor) -> dict[str, Tensor]:
        """The plain VQ objective on float images (B, 3, H, W) in [-1, 1].

        "reconstruction" (L1), "codebook", "commitment" (unweighted) and "total" =
        reconstruction + codebook + COMMITMENT_BETA * commitment. The perceptual (LPIPS,
        needs pretrained VGG weights) and adversarial terms of a full VQGAN are added by the
        training stage, not here.
        """
        out = self(x)
        reconstruction = F.l1_loss(out.reconstruction, x)
        total = reconstruction + out.codebook_loss + COMMITMENT_BETA * out.commitment_loss
        return {
            "reconstruction": reconstruction,
            "codebook": out.codebook_loss,
            "commitment": out.commitment_loss,
            "total": total,
        }

    # -- internals ------------------------------------------------------------------------

    def _latents(self, x: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) -> unnormalised latents (B, N, D), row-major."""
        return self.quant_conv(self.encoder(x)).flatten(2).transpose(1, 2)

    def _reconstruct(self, z: Tensor) -> Tensor:
        """Code vectors (B, N, D), row-major -> pixels (B, 3, H, W) in [-1, 1]."""
        b, _, d = z.shape
        z = z.transpose(1, 2).reshape(b, d, self.side, self.side)
        return self.decoder(self.post_quant_conv(z))
