"""Token sampling for video generation: greedy, or top-k with temperature from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """greedy: argmax (deterministic, what the tests use). Otherwise sample from the
    ``top_k`` most likely tokens (0 = all) after dividing the logits by ``temperature``,
    with a CPU generator seeded by ``seed`` (the same seed gives the same frames)."""

    greedy: bool = True
    top_k: int = 0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def generator(self) -> torch.Generator:
        """A fresh CPU generator for one generation call."""
        return torch.Generator().manual_seed(self.seed)


GREEDY = Sampling()


def sample_tokens(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> Tensor:
    """logits (B, K) -> token ids (B,) long, on the logits' device."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float().cpu() / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        kth = scaled.topk(sampling.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)
