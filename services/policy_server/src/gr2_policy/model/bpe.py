"""CLIP's byte-level BPE tokenizer (vocab.json + merges.txt), written for GR-2.

Same token ids as OpenAI CLIP's ``SimpleTokenizer`` and HF's ``CLIPTokenizer``:

1. Cleanup: ``html.unescape`` twice, NFC, whitespace runs -> one space, strip, lowercase.
   OpenAI CLIP also runs ``ftfy.fix_text`` (repairs mojibake); ftfy is not a dependency
   here, so already-broken text ("cafÃ©") is tokenized as is. Well-formed text is unaffected.
   The HTML unescaping follows OpenAI; HF's tokenizers-backed CLIPTokenizer skips it, so
   the two differ only on texts with HTML entities ("&amp;").
2. Split into words with CLIP's regex (letter runs, single digits, punctuation runs,
   English contractions, the two special tokens).
3. Map each word's UTF-8 bytes to printable characters (GPT-2's bytes-to-unicode table),
   mark the last character with ``</w>``, and apply merges in rank order (lowest first).
4. Wrap in ``<|startoftext|>`` ... ``<|endoftext|>``.

Characters missing from vocab.json become ``<|endoftext|>`` (HF's unk token); with a real
CLIP vocabulary every byte is present, so that never happens.
"""

from __future__ import annotations

import functools
import html
import itertools
import json
import re
import unicodedata
from pathlib import Path

import regex
import torch
from torch import Tensor

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"

_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = re.compile(r"\s+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...)
    map to code points 256, 257, ... in byte order, so every token is visible text
    without whitespace.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def clean_text(text: str) -> str:
    """The normalisation applied before splitting (see the module docstring)."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip().lower()


class TokenizerFileError(ValueError):
    """vocab.json or merges.txt is missing or malformed (callers wrap it in their error)."""


class CLIPBPETokenizer:
    """CLIP tokenizer over an in-memory vocabulary and merge list."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
        for special in (BOS_TOKEN, EOS_TOKEN):
            if special not in vocab:
                raise TokenizerFileError(f"{VOCAB_FILE} has no {special} token")
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        # Pad with EOS like HF: pooling reads the first EOS and attention is causal, so
        # whatever follows it never changes the result.
        self.pad_id = self.eos_id
        self._byte_chars = bytes_to_unicode()
        # Per-instance cache (an lru_cache on the method would keep every instance alive).
        self._word_ids = functools.lru_cache(maxsize=65536)(self._word_ids_uncached)

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id."""
        return max(self.vocab.values()) + 1

    # -- files ---------------------------------------------------------------------------

    @classmethod
    def from_directory(cls, directory: Path) -> CLIPBPETokenizer:
        """Read ``vocab.json`` and ``merges.txt``; TokenizerFileError names what is wrong."""
        vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise TokenizerFileError(f"{path.name} is missing")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerFileError(f"{VOCAB_FILE} is not readable JSON: {exc}") from exc
        if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in vocab.items()
        ):
            raise TokenizerFileError(f"{VOCAB_FILE} must map token strings to ids >= 0")
        try:
            lines = merges_path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerFileError(f"{MERGES_FILE} is not readable: {exc}") from exc
        merges: list[tuple[str, str]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip() or (number == 1 and line.startswith("#version")):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerFileError(
                    f"{MERGES_FILE} line {number} must be two tokens, got {line!r}"
                )
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges)

    def save(self, directory: Path) -> None:
        """Write ``vocab.json`` and ``merges.txt`` (readable by HF's CLIPTokenizer too)."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / VOCAB_FILE).write_text(
            json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8"
        )
        body = "".join(f"{a} {b}\n" for a, b in self.merges)
        (directory / MERGES_FILE).write_text("#version: 0.2\n" + body, encoding="utf-8")

    # -- tokenizing ----------------------------------------------------------------------

    def _bpe(self, word: str) -> list[str]:
        """Byte-mapped word -> its BPE symbols (the last one carries ``</w>``)."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = itertools.pairwise(symbols)
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        if word in (BOS_TOKEN, EOS_TOKEN):
            return (self.vocab[word],)
        mapped = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
        return tuple(self.vocab.get(symbol, self.eos_id) for symbol in self._bpe(mapped))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one text, without BOS/EOS."""
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def encode_batch(self, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
        """ids (B, max_len) long and eos_positions (B,) long, on CPU.

        Each row is BOS + tokens + EOS, with the tokens truncated to ``max_len - 2`` so
        the EOS is always present, then right-padded with ``pad_id`` (the EOS id). The EOS
        position is the first EOS id in the row, as in HF (a literal "<|endoftext|>" in the
        text therefore ends what the pooled embedding sees).
        """
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (BOS + EOS), got {max_len}")
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        eos_positions = torch.empty(len(texts), dtype=torch.long)
        for row, text in enumerate(texts):
            row_ids = [self.bos_id, *self.tokenize(text)[: max_len - 2], self.eos_id]
            ids[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            eos_positions[row] = row_ids.index(self.eos_id)
        return ids, eos_positions
