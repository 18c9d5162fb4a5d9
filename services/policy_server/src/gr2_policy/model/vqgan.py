"""VQ image tokenizer (the VQGAN's encoder, codebook and decoder; its discriminator is a
training-time part and lives with training).

Images (B, H, W, 3) uint8 -> token ids (B, N) with N = (H / f) ** 2 in row-major order, and
back to pixels. Codes are looked up by cosine similarity (l2-normalised codes, as ViT-VQGAN),
which keeps the codebook well used, also at random initialisation.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn.functional import normalize

from gr2_policy.model.config import GR2Config


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> same shape."""
        return x + self.body(x)


class VQGAN(nn.Module):
    """Conv encoder (downsampling by f), codebook (K x D), conv decoder (upsampling by f)."""

    def __init__(self, cfg: GR2Config) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.side = cfg.tokens_per_side
        levels = cfg.vq_downsample.bit_length() - 1  # log2(f) stride-2 stages
        chans = [cfg.vq_channels * min(2**i, 4) for i in range(levels + 1)]

        enc: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1)]
        for c_in, c_out in itertools.pairwise(chans):
            enc += [ResBlock(c_in), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
        enc += [ResBlock(chans[-1]), _norm(chans[-1]), nn.SiLU()]
        enc += [nn.Conv2d(chans[-1], cfg.codebook_dim, 1)]
        self.encoder = nn.Sequential(*enc)

        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        nn.init.normal_(self.codebook.weight)

        dec: list[nn.Module] = [nn.Conv2d(cfg.codebook_dim, chans[-1], 3, padding=1)]
        dec += [ResBlock(chans[-1])]
        for c_in, c_out in zip(chans[:0:-1], chans[-2::-1], strict=True):
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest")]
            dec += [nn.Conv2d(c_in, c_out, 3, padding=1), ResBlock(c_out)]
        dec += [_norm(chans[0]), nn.SiLU(), nn.Conv2d(chans[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, images: Tensor) -> Tensor:
        """uint8 (B, H, W, 3) RGB -> token ids (B, N) long, row-major over the token grid."""
        if images.dtype != torch.uint8 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected uint8 images (B, {self.image_size}, {self.image_size}, 3), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        x = images.permute(0, 3, 1, 2).to(self.codebook.weight.dtype) / 127.5 - 1.0
        z = self.encoder(x).flatten(2).transpose(1, 2)  # (B, N, D)
        return self.quantize(z)

    def quantize(self, z: Tensor) -> Tensor:
        """Latents (B, N, D) -> ids (B, N) of the most similar codes (cosine similarity)."""
        codes = normalize(self.codebook.weight, dim=-1)
        return (normalize(z, dim=-1) @ codes.T).argmax(dim=-1)

    def decode(self, ids: Tensor) -> Tensor:
        """Token ids (B, N) long -> uint8 images (B, H, W, 3)."""
        b = ids.shape[0]
        z = normalize(self.codebook(ids), dim=-1)  # (B, N, D)
        z = z.transpose(1, 2).reshape(b, -1, self.side, self.side)
        x = torch.tanh(self.decoder(z))
        pixels = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1)
