"""Text encoders: the byte encoder, and the CLIP tower + BPE tokenizer checked against HF.

The reference is ``transformers`` (CLIPTokenizer, CLIPTextModelWithProjection, CLIPModel)
on tiny random models and a small hand-made vocabulary written to tmp directories; nothing
is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from gr2_policy.errors import CheckpointError
from gr2_policy.model import GR2Policy, load_checkpoint, save_checkpoint
from gr2_policy.model.bpe import (
    BOS_TOKEN,
    EOS_TOKEN,
    CLIPBPETokenizer,
    bytes_to_unicode,
    clean_text,
)
from gr2_policy.model.clip_text import CLIPTextEncoder, load_clip_text_weights
from gr2_policy.model.config import GR2Config
from gr2_policy.model.text_encoder import ByteTextEncoder, HashedWordEncoder, build_text_encoder
from safetensors.torch import load_file, save_file

MAX_LEN = 16
WIDTH, LAYERS, HEADS, PROJ = 64, 2, 4, 48

TEXTS = [
    "Pick up the red block",
    "pick  up\tthe\nRED   block!!",
    "it's the robot's cup, isn't it? We'll see; they'd've DON'T",
    "Place 3 blocks at 12.5cm -> 100%",
    "café é naïve Ünïcödé e\u0301",
    "emoji 😀🤖 and ✨sparkles✨",
    "中文字符 mixed with english",
    "ＦＵＬＬＷＩＤＴＨ İstanbul ß",
    "",
    "   ",
    "a",
    "blue",
    "pick up the red block and place it on the blue block " * 4,
    "x" * 300,
    "?!...;;--__ ''' \"quoted\" (paren) [brack] {brace}",
]

# Words the test vocabulary has merges for; "e d</w>" is ranked before "r e" so the rank
# order matters for "red".
_GENERIC_MERGES = [("e", "d</w>"), ("t", "h"), ("i", "n"), ("in", "g</w>"), ("o", "n</w>")]
_WORDS = ["pick", "up", "the", "red", "block", "place", "blue", "it", "cup", "robot", "and"]


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges building ``word`` both as a whole word and as a prefix."""
    merges = []
    for final in (True, False):
        symbols = [*word[:-1], word[-1] + ("</w>" if final else "")]
        acc = symbols[0]
        for sym in symbols[1:]:
            merges.append((acc, sym))
            acc += sym
    return merges


def make_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-shaped vocabulary: bytes, bytes + </w>, merge results, then the two specials."""
    merges: list[tuple[str, str]] = []
    for pair in _GENERIC_MERGES + [m for w in _WORDS for m in _word_merges(w)]:
        if pair not in merges:
            merges.append(pair)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


VOCAB, MERGES = make_vocab()
V = len(VOCAB)


def write_tokenizer_files(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(VOCAB, ensure_ascii=False), "utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in MERGES)
    (directory / "merges.txt").write_text("#version: 0.2\n" + lines, "utf-8")


def text_kwargs() -> dict[str, Any]:
    return {
        "vocab_size": V,
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": MAX_LEN,
        "projection_dim": PROJ,
        "hidden_act": "quick_gelu",
        "bos_token_id": VOCAB[BOS_TOKEN],
        "eos_token_id": VOCAB[EOS_TOKEN],
        "pad_token_id": VOCAB[EOS_TOKEN],
    }


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Random non-trivial values everywhere (HF inits LayerNorms and biases to 1 / 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def small_encoder(**overrides: int) -> CLIPTextEncoder:
    cfg = GR2Config(
        text_encoder="clip",
        text_vocab_size=overrides.get("vocab_size", V),
        text_dim=overrides.get("width", WIDTH),
        text_layers=overrides.get("layers", LAYERS),
        text_heads=overrides.get("heads", HEADS),
        text_max_len=overrides.get("max_len", MAX_LEN),
        text_embed_dim=overrides.get("embed_dim", PROJ),
    )
    encoder = build_text_encoder(cfg)
    assert isinstance(encoder, CLIPTextEncoder)
    return encoder.eval()


@pytest.fixture(scope="module")
def hf() -> ModuleType:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers  # a dev requirement: the reference we check CLIP against

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(directory)
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(hf: ModuleType, tok_dir: Path) -> Any:
    return hf.CLIPTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def text_model_dir(hf: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIPTextModelWithProjection saved HF-style, with the tokenizer files."""
    directory = tmp_path_factory.mktemp("clip_text")
    torch.manual_seed(0)
    model = hf.CLIPTextModelWithProjection(hf.CLIPTextConfig(**text_kwargs())).eval()
    perturb_(model, 1)
    model.save_pretrained(str(directory))
    write_tokenizer_files(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


def reference_embeds(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(
        texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


# -- tokenizer ---------------------------------------------------------------------------


def test_bpe_ids_match_hf_clip_tokenizer(tok_dir: Path, hf_tokenizer: Any) -> None:
    ours = CLIPBPETokenizer.from_directory(tok_dir)
    for text in [*TEXTS, "<|endoftext|> inside", "the red block"]:
        ref = hf_tokenizer(text)["input_ids"]
        assert [ours.bos_id, *ours.tokenize(text), ours.eos_id] == ref, text
    # Merges were used, and ranks decide: "e d</w>" comes before "r e".
    assert ours.tokenize("pick the red") == [
        VOCAB["pick</w>"],
        VOCAB["the</w>"],
        VOCAB["r"],
        VOCAB["ed</w>"],
    ]
    ids, eos = ours.encode_batch(TEXTS, MAX_LEN)
    ref = hf_tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt"
    )
    assert torch.equal(ids, ref["input_ids"])
    assert ids.shape == (len(TEXTS), MAX_LEN)
    assert torch.equal(eos, (ids == ours.eos_id).int().argmax(dim=1).long())
    assert int(eos.max()) == MAX_LEN - 1  # long texts keep their EOS after truncation


def test_bpe_cleanup_unescapes_html_and_collapses_whitespace() -> None:
    assert clean_text("  Tom &amp;amp; JERRY\n\t&lt;3  ") == "tom & jerry <3"
    tok = CLIPBPETokenizer(VOCAB, MERGES)
    assert tok.tokenize("pick &amp; place") == tok.tokenize("pick & place")
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(["x"], 1)


# -- CLIP tower vs HF --------------------------------------------------------------------


def test_clip_text_matches_hf_text_model_with_projection(
    hf: ModuleType, text_model_dir: Path, hf_tokenizer: Any
) -> None:
    encoder = small_encoder()
    load_clip_text_weights(encoder, text_model_dir)
    assert encoder.dim == PROJ
    model = hf.CLIPTextModelWithProjection.from_pretrained(str(text_model_dir)).eval()
    with torch.no_grad():
        ours = encoder.encode(TEXTS)
    ref = reference_embeds(model, hf_tokenizer, TEXTS)
    assert ours.shape == (len(TEXTS), PROJ)
    assert (ours - ref).abs().max().item() < 1e-5
    with torch.no_grad():  # batching and padding do not change a text's embedding
        single = encoder.encode([TEXTS[0]])
    assert (single[0] - ours[0]).abs().max().item() < 1e-5


def test_clip_text_loads_full_clip_model_file(
    hf: ModuleType, tmp_path: Path, hf_tokenizer: Any
) -> None:
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 16,
    }
    # The top-level projection_dim is what CLIPModel uses (the text_config's is ignored).
    config = hf.CLIPConfig(text_config=text_kwargs(), vision_config=vision, projection_dim=40)
    torch.manual_seed(2)
    model = hf.CLIPModel(config).eval()
    perturb_(model, 3)
    model.save_pretrained(str(tmp_path))
    write_tokenizer_files(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in saved
    assert any(k.startswith("vision_model.") for k in load_file(tmp_path / "model.safetensors"))

    encoder = small_encoder(embed_dim=40)
    load_clip_text_weights(encoder, tmp_path)
    texts = TEXTS[:5]
    batch = hf_tokenizer(
        texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt"
    )
    with torch.no_grad():
        ref = model.get_text_features(**batch).pooler_output
        ours = encoder.encode(texts)
    assert ref.shape == ours.shape == (5, 40)
    assert (ours - ref).abs().max().item() < 1e-5


def test_clip_legacy_eos_token_id_is_accepted(text_model_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "clip"
    shutil.copytree(text_model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    encoder = small_encoder()
    load_clip_text_weights(encoder, directory)
    reference = small_encoder()
    load_clip_text_weights(reference, text_model_dir)
    with torch.no_grad():
        assert torch.equal(encoder.encode(TEXTS[:3]), reference.encode(TEXTS[:3]))
    (directory / "config.json").write_text(json.dumps({**config, "eos_token_id": 5}))
    with pytest.raises(CheckpointError, match=r"eos_token_id is 5 .* id is \d+"):
        load_clip_text_weights(small_encoder(), directory)


@pytest.mark.parametrize(
    ("overrides", "config_patch", "message"),
    [
        (
            {"width": 32, "heads": 4},
            {},
            r"hidden_size is 64 but the model config expects text_dim 32",
        ),
        ({"layers": 3}, {}, r"num_hidden_layers is 2 but the model config expects text_layers 3"),
        ({"heads": 8}, {}, r"num_attention_heads is 4 .* text_heads 8"),
        ({"max_len": 20}, {}, r"max_position_embeddings is 16 .* text_max_len 20"),
        ({"embed_dim": 32}, {}, r"projection_dim is 48 .* text_embed_dim 32"),
        ({"vocab_size": V + 1}, {}, rf"vocab_size is {V} .* text_vocab_size {V + 1}"),
        ({}, {"hidden_act": "gelu"}, r"hidden_act is 'gelu'"),
        ({}, {"intermediate_size": 128}, r"intermediate_size is 128 .* 4 \* text_dim = 256"),
    ],
    ids=["width", "layers", "heads", "max_len", "embed_dim", "vocab", "act", "mlp"],
)
def test_clip_config_mismatch_names_field_and_values(
    text_model_dir: Path,
    tmp_path: Path,
    overrides: dict[str, int],
    config_patch: dict[str, Any],
    message: str,
) -> None:
    directory = text_model_dir
    if config_patch:
        directory = tmp_path / "clip"
        shutil.copytree(text_model_dir, directory)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **config_patch}))
    encoder = small_encoder(**overrides)
    with pytest.raises(CheckpointError, match=message) as info:
        load_clip_text_weights(encoder, directory)
    assert str(directory) in str(info.value)
    assert encoder.tokenizer is None  # a failed load changes nothing


def test_clip_missing_files_and_tensors(text_model_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "clip"
    shutil.copytree(text_model_dir, directory)
    (directory / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match=r"merges.txt is missing"):
        load_clip_text_weights(small_encoder(), directory)

    shutil.copy(text_model_dir / "merges.txt", directory / "merges.txt")
    key = "text_model.encoder.layers.1.mlp.fc2.bias"
    tensors = load_file(directory / "model.safetensors")
    del tensors[key]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"no tensor {key}"):
        load_clip_text_weights(small_encoder(), directory)

    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json is missing"):
        load_clip_text_weights(small_encoder(), directory)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_clip_text_weights(small_encoder(), tmp_path / "nowhere")


def test_clip_gr2_base_parameter_count_matches_hf(hf: ModuleType) -> None:
    base = GR2Config.from_preset("gr2-base")
    with torch.device("meta"):
        ours = build_text_encoder(base)
        ref = hf.CLIPTextModelWithProjection(
            hf.CLIPTextConfig(
                vocab_size=49408,
                hidden_size=512,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=8,
                max_position_embeddings=77,
                projection_dim=512,
                hidden_act="quick_gelu",
            )
        )
    assert isinstance(ours, CLIPTextEncoder) and ours.dim == 512
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"gr2-base CLIP text tower: {n_ours:,} parameters (HF: {n_ref:,})")
    assert n_ours == n_ref
    assert 63.0e6 < n_ours < 63.5e6


def test_clip_tokenizer_save_load_round_trip(
    text_model_dir: Path, tmp_path: Path, hf: ModuleType
) -> None:
    encoder = small_encoder()
    with pytest.raises(RuntimeError, match=r"no tokenizer: load vocab\.json and merges\.txt"):
        encoder.encode(["pick"])
    load_clip_text_weights(encoder, text_model_dir)
    encoder.save_tokenizer(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["merges.txt", "vocab.json"]

    restored = small_encoder()
    restored.load_state_dict(encoder.state_dict())
    restored.load_tokenizer(tmp_path / "saved")
    assert restored.tokenizer is not None and encoder.tokenizer is not None
    assert restored.tokenizer.vocab == encoder.tokenizer.vocab
    assert restored.tokenizer.merges == encoder.tokenizer.merges
    with torch.no_grad():
        assert torch.equal(restored.encode(TEXTS), encoder.encode(TEXTS))
    # The written files are valid HF tokenizer files too.
    hf_tok = hf.CLIPTokenizer.from_pretrained(str(tmp_path / "saved"))
    ids, _ = encoder.tokenizer.encode_batch(TEXTS, MAX_LEN)
    ref = hf_tok(TEXTS, padding="max_length", truncation=True, max_length=MAX_LEN)
    assert ids.tolist() == ref["input_ids"]

    with pytest.raises(CheckpointError, match=r"vocab.json is missing"):
        restored.load_tokenizer(tmp_path / "empty")
    too_small = small_encoder(vocab_size=V - 1)
    with pytest.raises(CheckpointError, match=rf"ids up to {V - 1} .* text_vocab_size {V - 1}"):
        too_small.load_tokenizer(tmp_path / "saved")


# -- byte encoder ------------------------------------------------------------------------


def test_byte_encoder_is_unchanged(tmp_path: Path) -> None:
    cfg = GR2Config()
    encoder = build_text_encoder(cfg)
    assert isinstance(encoder, ByteTextEncoder)
    assert encoder.dim == cfg.text_dim and encoder.max_len == cfg.text_max_len
    names = {name for name, _ in encoder.named_parameters()}
    assert {"embed.weight", "pos_embed", "norm.weight"} <= names
    ids, mask = encoder.tokenize(["ab", "é" * 100, ""])
    assert ids.shape == (3, cfg.text_max_len)
    assert ids[0, :3].tolist() == [1, ord("a") + 2, ord("b") + 2]
    assert ids[1, 1:3].tolist() == [0xC3 + 2, 0xA9 + 2]
    assert mask.sum(dim=1).tolist() == [3, cfg.text_max_len, 1]
    with torch.no_grad():
        emb = encoder.encode(["pick", "pick", "place"])
    assert emb.shape == (3, cfg.text_dim)
    assert torch.equal(emb[0], emb[1]) and not torch.equal(emb[0], emb[2])
    encoder.save_tokenizer(tmp_path)
    encoder.load_tokenizer(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with torch.device("meta"):
        meta = build_text_encoder(cfg)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in encoder.parameters())


# -- hashed words encoder ----------------------------------------------------------------


def test_words_encoder_tells_instructions_apart_and_is_the_same_everywhere() -> None:
    cfg = GR2Config(text_encoder="words")
    encoder = build_text_encoder(cfg)
    assert isinstance(encoder, HashedWordEncoder)
    assert encoder.state_dict() == {} and list(encoder.parameters()) == []
    texts = ["touch the red block", "touch the blue block", "Touch  the RED block!", ""]
    emb = encoder.encode(texts)
    assert emb.shape == (4, cfg.text_dim) and emb.dtype == torch.float32
    assert torch.equal(emb[0], emb[2])  # case and punctuation do not matter
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0)
    assert 0.5 < float(cos) < 0.9  # 3 of 4 words shared: ~0.75
    # The vectors come from the word alone: a fresh encoder (no shared state) agrees.
    assert torch.equal(HashedWordEncoder(cfg.text_dim).encode(texts), emb)
    assert torch.equal(emb[3], encoder.word_vector(""))
    # It follows the policy's dtype (a float16 checkpoint) without weights to convert.
    assert encoder.to(torch.float16).encode(texts[:1]).dtype == torch.float16


def test_words_encoder_config_is_checked() -> None:
    with pytest.raises(ValueError, match="words text encoder needs text_embed_dim"):
        GR2Config(text_encoder="words", text_embed_dim=64)


def test_policy_checkpoint_with_clip_text_encoder_round_trips(
    text_model_dir: Path, tmp_path: Path
) -> None:
    """A GR-2 model whose text tower is CLIP's: the weights travel in model.safetensors, the
    tokenizer in text_tokenizer/, and a checkpoint without the tokenizer is refused."""
    config = GR2Config.from_preset(
        "gr2-tiny",
        text_encoder="clip",
        text_vocab_size=V,
        text_dim=WIDTH,
        text_layers=LAYERS,
        text_heads=HEADS,
        text_max_len=MAX_LEN,
        text_embed_dim=PROJ,
    )
    model = GR2Policy(config).eval()
    assert isinstance(model.text_encoder, CLIPTextEncoder)
    load_clip_text_weights(model.text_encoder, text_model_dir)
    directory = save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(directory)
    with torch.inference_mode():
        expected = model.encode_instruction(TEXTS[:3])
        torch.testing.assert_close(loaded.encode_instruction(TEXTS[:3]), expected, rtol=0, atol=0)
    shutil.rmtree(directory / "text_tokenizer")
    with pytest.raises(CheckpointError, match="no text_tokenizer/"):
        load_checkpoint(directory)
