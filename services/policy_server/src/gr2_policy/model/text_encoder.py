"""Frozen text encoders: instruction strings -> one pooled embedding per string.

``TextEncoder`` is the interface the policy depends on; ``build_text_encoder`` picks the
implementation named by ``GR2Config.text_encoder``:

- "byte": ``ByteTextEncoder``, small and built in (UTF-8 bytes, no vocabulary file), so a
  model is self-contained;
- "words": ``HashedWordEncoder``, no weights at all: a fixed pseudo-random vector per word,
  averaged. Instructions that differ in one word ("red" / "blue") get clearly different
  embeddings (cosine ~0.75 for four-word instructions), where the untrained byte encoder
  gives 0.92-0.94 and the policy learns to follow the instruction far more slowly;
- "clip": ``gr2_policy.model.clip_text.CLIPTextEncoder``, CLIP's text tower, whose BPE
  tokenizer files (vocab.json + merges.txt) travel with the checkpoint.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from gr2_policy.model.config import GR2Config
from gr2_policy.model.gpt import INIT_STD, Block, init_transformer_


class TextEncoder(nn.Module, ABC):
    """Maps instructions to embeddings (B, dim). Frozen inside the policy."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of the pooled embedding."""

    @abstractmethod
    def encode(self, texts: list[str]) -> Tensor:
        """texts (B strings) -> float tensor (B, dim) on the encoder's device."""

    @abstractmethod
    def save_tokenizer(self, directory: Path) -> None:
        """Write the tokenizer's files (if it has any) into ``directory``."""

    @abstractmethod
    def load_tokenizer(self, directory: Path) -> None:
        """Read the tokenizer's files (if it has any) from ``directory``."""


class ByteTextEncoder(TextEncoder):
    """UTF-8 byte tokenizer + embedding + small transformer + masked mean pool.

    Token ids: 0 = pad, 1 = BOS (always first, so no sequence is empty), byte b -> b + 2.
    Sequences are truncated to ``max_len`` tokens (BOS included) and right-padded.
    """

    PAD, BOS, BYTE_OFFSET = 0, 1, 2
    VOCAB_SIZE = 256 + BYTE_OFFSET

    def __init__(self, dim: int, n_layers: int, n_heads: int, max_len: int) -> None:
        super().__init__()
        self._dim = dim
        self.max_len = max_len
        self.embed = nn.Embedding(self.VOCAB_SIZE, dim)
        self.pos_embed = nn.Parameter(torch.empty(max_len, dim))
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        init_transformer_(self, n_layers)
        nn.init.normal_(self.pos_embed, std=INIT_STD)

    @property
    def dim(self) -> int:
        return self._dim

    def save_tokenizer(self, directory: Path) -> None:
        """No-op: the byte tokenizer has no files."""

    def load_tokenizer(self, directory: Path) -> None:
        """No-op: the byte tokenizer has no files."""

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """ids (B, max_len) long and mask (B, max_len) bool (True = real token), on CPU."""
        ids = np.full((len(texts), self.max_len), self.PAD, dtype=np.int64)
        ids[:, 0] = self.BOS
        for row, text in enumerate(texts):
            raw = np.frombuffer(text.encode("utf-8")[: self.max_len - 1], dtype=np.uint8)
            ids[row, 1 : 1 + raw.size] = raw.astype(np.int64) + self.BYTE_OFFSET
        ids_t = torch.from_numpy(ids)
        return ids_t, ids_t != self.PAD

    def encode(self, texts: list[str]) -> Tensor:
        """texts (B strings) -> (B, dim): mean over the real tokens' final states."""
        ids, mask = self.tokenize(texts)
        device = self.embed.weight.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.embed(ids) + self.pos_embed
        attn_mask = mask[:, None, None, :]  # padding keys are ignored
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.norm(x)
        weights = mask[..., None].to(x.dtype)
        return (x * weights).sum(dim=1) / weights.sum(dim=1)


class HashedWordEncoder(TextEncoder):
    """Lower-cased words (``\\w+`` runs) -> the mean of one fixed vector per word.

    A word's vector is N(0, 1)^dim drawn from a generator seeded with the SHA-256 of the
    word, so it is the same in every process and on every machine, needs no vocabulary file
    and exists for any word (an unseen word gets a vector the policy never learned to read).
    A text with no word gets the vector of the empty string.
    """

    WORD = re.compile(r"\w+")

    def __init__(self, dim: int) -> None:
        super().__init__()
        self._dim = dim
        self._vectors: dict[str, Tensor] = {}
        self.register_buffer("_device", torch.empty(0), persistent=False)  # follows .to()

    @property
    def dim(self) -> int:
        return self._dim

    def save_tokenizer(self, directory: Path) -> None:
        """No-op: there are no files."""

    def load_tokenizer(self, directory: Path) -> None:
        """No-op: there are no files."""

    def words(self, text: str) -> list[str]:
        return self.WORD.findall(text.lower()) or [""]

    def word_vector(self, word: str) -> Tensor:
        """The fixed (dim,) float32 vector of ``word``, on CPU."""
        vector = self._vectors.get(word)
        if vector is None:
            seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
            generator = torch.Generator().manual_seed(seed)
            vector = torch.randn(self._dim, generator=generator)
            self._vectors[word] = vector
        return vector

    def encode(self, texts: list[str]) -> Tensor:
        """texts (B strings) -> (B, dim): the mean of each text's word vectors."""
        rows = [torch.stack([self.word_vector(w) for w in self.words(t)]).mean(0) for t in texts]
        return torch.stack(rows).to(self._device.device, self._device.dtype)


def build_text_encoder(cfg: GR2Config) -> TextEncoder:
    """The text encoder ``cfg`` names, freshly initialised (works under a meta device).

    A "clip" encoder has no tokenizer yet: load one with ``load_tokenizer`` (from a GR-2
    checkpoint) or ``clip_text.load_clip_text_weights`` (from a local HF CLIP directory).
    """
    if cfg.text_encoder == "byte":
        return ByteTextEncoder(cfg.text_dim, cfg.text_layers, cfg.text_heads, cfg.text_max_len)
    if cfg.text_encoder == "words":
        return HashedWordEncoder(cfg.text_dim)
    if cfg.text_encoder == "clip":
        from gr2_policy.model.clip_text import CLIPTextEncoder  # lazy: clip_text imports us

        return CLIPTextEncoder(
            vocab_size=cfg.text_vocab_size,
            width=cfg.text_dim,
            layers=cfg.text_layers,
            heads=cfg.text_heads,
            max_len=cfg.text_max_len,
            embed_dim=cfg.text_embed_dim,
        )
    raise ValueError(f"unknown text_encoder {cfg.text_encoder!r}")
