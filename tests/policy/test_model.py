"""GR2Policy (gr2-tiny): presets, shapes, determinism, input sensitivity, padding, rotations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from gr2_policy.errors import CheckpointError
from gr2_policy.model import (
    GR2Config,
    GR2Policy,
    count_parameters,
    init_random_policy,
    load_checkpoint,
    model_hash,
    save_checkpoint,
)
from gr2_policy.model.gpt import attention_mask
from gr2_policy.model.policy import ActionPrediction
from gr2_policy.model.rotations import (
    matrix_to_quat,
    matrix_to_rot6d,
    quat_normalize,
    quat_to_matrix,
    quat_to_rot6d,
    rot6d_to_matrix,
    rot6d_to_quat,
)
from safetensors.torch import load_file, save_file

B, T = 2, 4


@pytest.fixture(scope="module")
def policy() -> GR2Policy:
    return init_random_policy("gr2-tiny", seed=0)


def random_quats(n: int, gen: torch.Generator) -> torch.Tensor:
    return quat_normalize(torch.randn(n, 4, generator=gen))


def make_window(policy: GR2Policy, seed: int = 0, b: int = B, t: int = T) -> dict:
    """Random images (tokenized), states and instructions for a (b, t) window."""
    cfg = policy.config
    gen = torch.Generator().manual_seed(seed)
    size = cfg.image_size
    images = torch.randint(0, 256, (b * t, len(cfg.views), size, size, 3), generator=gen)
    states = torch.cat(
        (
            torch.rand(b * t, 3, generator=gen) * 0.5,
            random_quats(b * t, gen),
            torch.rand(b * t, 1, generator=gen),
        ),
        dim=-1,
    )
    with torch.inference_mode():
        tokens = policy.tokenize_images(images.to(torch.uint8))
        lang = policy.encode_instruction(["pick up the red block", "open the top drawer"][:b])
    tokens, lang = tokens.clone(), lang.clone()  # normal tensors: tests edit them in place
    return {
        "lang": lang,
        "image_tokens": tokens.view(b, t, *tokens.shape[1:]),
        "states": states.view(b, t, 8),
    }


def predict(policy: GR2Policy, window: dict) -> ActionPrediction:
    with torch.inference_mode():
        return policy.predict_actions(**window)


def max_diff(a: ActionPrediction, b: ActionPrediction) -> float:
    return max(
        float((a.positions - b.positions).abs().max()),
        float((a.quats_wxyz - b.quats_wxyz).abs().max()),
        float((a.grippers - b.grippers).abs().max()),
    )


# -- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "d_model", "tokens_per_view"),
    [("gr2-tiny", 128, 64), ("gr2-small", 384, 64), ("gr2-base", 768, 256)],
)
def test_presets_construct_and_round_trip_through_json(
    preset: str, d_model: int, tokens_per_view: int
) -> None:
    cfg = GR2Config.from_preset(preset)
    assert (cfg.preset, cfg.d_model, cfg.tokens_per_view) == (preset, d_model, tokens_per_view)
    assert cfg.views == ("head", "wrist")
    assert GR2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_tiny_preset_matches_design() -> None:
    cfg = GR2Config.from_preset("gr2-tiny")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (128, 4, 4)
    assert (cfg.image_size, cfg.vq_downsample, cfg.codebook_size) == (64, 8, 512)
    assert (cfg.history, cfg.action_horizon, cfg.waypoint_dt_s) == (4, 10, 0.1)
    assert (cfg.state_dim, cfg.latent_dim, cfg.tokens_per_step) == (8, 32, 130)


def test_config_rejects_bad_values_and_unknown_fields() -> None:
    with pytest.raises(ValueError, match="vq_downsample"):
        GR2Config.from_preset("gr2-tiny", vq_downsample=6)
    with pytest.raises(ValueError, match=r"head count"):
        GR2Config.from_preset("gr2-tiny", n_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        GR2Config.from_preset("gr2-huge")
    data = GR2Config.from_preset("gr2-tiny").to_dict()
    with pytest.raises(ValueError, match="dropout"):
        GR2Config.from_dict({**data, "dropout": 0.1})
    del data["history"]
    with pytest.raises(ValueError, match="history"):
        GR2Config.from_dict(data)


@pytest.mark.parametrize("preset", ["gr2-small", "gr2-base"])
def test_larger_presets_build_with_paper_scale_counts(preset: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        counts = count_parameters(GR2Policy(GR2Config.from_preset(preset)))
    print(f"{preset}: {json.dumps(counts)}")
    assert counts["trainable"] == counts["gpt"] + counts["action_head"]
    if preset == "gr2-base":  # the paper: 230M total, 95M trainable (each +- 10%)
        assert 207e6 <= counts["total"] <= 253e6
        assert 85.5e6 <= counts["trainable"] <= 104.5e6
        assert 60e6 <= counts["text_encoder"] <= 66e6  # CLIP ViT-B/32 text tower
        assert 63e6 <= counts["vqgan"] <= 77e6


def test_parameter_counts_sum(policy: GR2Policy) -> None:
    counts = count_parameters(policy)
    parts = ("text_encoder", "vqgan", "gpt", "action_head")
    assert sum(counts[p] for p in parts) == counts["total"]
    assert counts["total"] == sum(p.numel() for p in policy.parameters())
    assert counts["trainable"] == counts["gpt"] + counts["action_head"]  # the rest is frozen
    assert counts["trainable"] < counts["total"]


# -- forward ----------------------------------------------------------------------------


def test_output_shapes_ranges_and_gentle_init(policy: GR2Policy) -> None:
    window = make_window(policy)
    out = predict(policy, window)
    k = policy.config.action_horizon
    assert out.positions.shape == (B, k, 3)
    assert out.quats_wxyz.shape == (B, k, 4)
    assert out.grippers.shape == (B, k)
    for tensor in (out.positions, out.quats_wxyz, out.grippers):
        assert torch.isfinite(tensor).all()
    torch.testing.assert_close(out.quats_wxyz.norm(dim=-1), torch.ones(B, k))
    assert ((out.grippers >= 0) & (out.grippers <= 1)).all()
    # An untrained model moves gently: a few cm and a few degrees from the current pose.
    current = window["states"][:, -1]
    assert (out.positions - current[:, None, :3]).norm(dim=-1).max() < 0.05
    dot = (out.quats_wxyz * quat_normalize(current[:, None, 3:7])).sum(-1).abs()
    assert (2 * torch.acos(dot.clamp(max=1.0))).max() < math.radians(15)


def test_same_seed_same_model_other_seed_other_model(policy: GR2Policy) -> None:
    again, other = init_random_policy("gr2-tiny", 0), init_random_policy("gr2-tiny", 1)
    window = make_window(policy)
    assert max_diff(predict(policy, window), predict(again, window)) == 0.0
    assert max_diff(predict(policy, window), predict(other, window)) > 1e-4


@pytest.mark.parametrize("change", ["old_image", "current_image", "old_state", "instruction"])
def test_actions_depend_on_inputs(policy: GR2Policy, change: str) -> None:
    window = make_window(policy)
    changed = {key: value.clone() for key, value in window.items()}
    if change == "old_image":
        changed["image_tokens"][:, 0] = (changed["image_tokens"][:, 0] + 1) % 512
    elif change == "current_image":
        changed["image_tokens"][:, -1] = (changed["image_tokens"][:, -1] + 7) % 512
    elif change == "old_state":  # not the current pose, so only the network can react
        changed["states"][:, 1, 7] = 1.0 - changed["states"][:, 1, 7]
    else:
        with torch.inference_mode():
            changed["lang"] = policy.encode_instruction(["close the gripper", "wave"])
    with torch.inference_mode():
        feature_change = (policy(**window).act - policy(**changed).act).abs()
    assert float(feature_change.max()) > 1e-4
    # Identical inputs give bit-identical actions (see the seed test), so any difference is
    # the input's effect. An untrained head damps it (state: ~1e-7 m), hence no threshold.
    assert max_diff(predict(policy, window), predict(policy, changed)) > 0.0


def test_rope_scores_depend_only_on_offsets(policy: GR2Policy) -> None:
    """The same window placed far into an episode (absolute positions ~1e6) gives the same
    actions up to rounding: RoPE angles are computed in float64."""
    window = make_window(policy, seed=3)
    with torch.inference_mode():
        late = policy.predict_actions(**window, first_step=10_000)
    assert max_diff(predict(policy, window), late) < 1e-5


def test_missing_state_uses_no_state_embedding(policy: GR2Policy) -> None:
    window = make_window(policy)
    state_valid = torch.ones(B, T, dtype=torch.bool)
    state_valid[:, 1] = False
    with torch.inference_mode():
        without = policy(**window, state_valid=state_valid).act
        window["states"][:, 1] = float("nan")  # ignored: that step has no state
        again = policy(**window, state_valid=state_valid).act
        assert torch.equal(without, again)
        assert float((without - policy(**make_window(policy)).act).abs().max()) > 1e-6


def test_attention_mask_is_causal_with_a_step_window() -> None:
    """4 steps of 3 tokens (P = 3) and h = 2, then the [ACT] queries of steps 2 and 3."""
    p, h = 3, 2
    step = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 2, 3])[None]
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3 * p, 4 * p])[None]
    act = torch.tensor([False] * 12 + [True, True])
    allowed = attention_mask(step, pos, act, step, pos, act, h)[0, 0]
    assert allowed.shape == (14, 14)
    # Token 7 (step 2) sees step 1 and its own step up to itself; not step 0, not later.
    assert torch.nonzero(allowed[7]).flatten().tolist() == [3, 4, 5, 6, 7]
    # [ACT] of step 2 sees the window of h = 2 steps and itself, not step 3 (same position
    # as step 3's first token) and not the other [ACT].
    assert torch.nonzero(allowed[12]).flatten().tolist() == [3, 4, 5, 6, 7, 8, 12]
    assert torch.nonzero(allowed[13]).flatten().tolist() == [6, 7, 8, 9, 10, 11, 13]
    assert not allowed[:12, 12:].any()  # no token attends to an [ACT]


# -- tokenizers -------------------------------------------------------------------------


def test_image_tokenizer_is_deterministic_and_batch_independent(policy: GR2Policy) -> None:
    cfg = policy.config
    gen = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (3, 2, 64, 64, 3), generator=gen).to(torch.uint8)
    with torch.inference_mode():
        tokens = policy.tokenize_images(images)
        assert tokens.shape == (3, 2, cfg.tokens_per_view) and tokens.dtype == torch.long
        assert torch.equal(tokens, policy.tokenize_images(images))
        assert torch.equal(tokens[1:2], policy.tokenize_images(images[1:2]))
        assert int(tokens.min()) >= 0 and int(tokens.max()) < cfg.codebook_size
        assert tokens.unique().numel() > 50  # codes are used, not collapsed to a few
        pixels = policy.vqgan.decode(tokens[:, 0])
    assert pixels.shape == (3, 64, 64, 3) and pixels.dtype == torch.uint8


def test_text_tokenizer_truncates_pads_and_handles_utf8(policy: GR2Policy) -> None:
    encoder = policy.text_encoder
    ids, mask = encoder.tokenize(["ab", "é" * 100, ""])
    assert ids.shape == (3, encoder.max_len)
    assert ids[0, :3].tolist() == [1, ord("a") + 2, ord("b") + 2]
    assert mask.sum(dim=1).tolist() == [3, encoder.max_len, 1]
    with torch.inference_mode():
        emb = encoder.encode(["pick", "pick", "place"])
    assert emb.shape == (3, policy.config.text_dim) and torch.isfinite(emb).all()
    assert torch.equal(emb[0], emb[1]) and not torch.equal(emb[0], emb[2])


# -- rotations --------------------------------------------------------------------------


def test_quaternion_matrix_round_trip_and_known_rotation() -> None:
    gen = torch.Generator().manual_seed(0)
    q = random_quats(1000, gen).double()
    m = quat_to_matrix(q)
    eye = torch.eye(3, dtype=torch.float64).expand(1000, 3, 3)
    torch.testing.assert_close(m @ m.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.det(m), torch.ones(1000, dtype=torch.float64))
    torch.testing.assert_close(matrix_to_quat(m), q)
    # 90 degrees about z maps x to y.
    q_z90 = torch.tensor([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)])
    torch.testing.assert_close(
        quat_to_matrix(q_z90) @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])
    )


def test_matrix_to_quat_is_robust_near_180_degrees() -> None:
    axes = torch.nn.functional.normalize(torch.randn(50, 3, dtype=torch.float64), dim=-1)
    q = torch.cat((torch.full((50, 1), 1e-9, dtype=torch.float64), axes), dim=-1)  # ~180 deg
    q = quat_normalize(q)
    torch.testing.assert_close(quat_to_matrix(matrix_to_quat(quat_to_matrix(q))), quat_to_matrix(q))


def test_rot6d_round_trips_and_gram_schmidt() -> None:
    gen = torch.Generator().manual_seed(1)
    q = random_quats(500, gen).double()
    r6 = quat_to_rot6d(q)
    assert r6.shape == (500, 6)
    torch.testing.assert_close(rot6d_to_quat(r6), q)
    torch.testing.assert_close(matrix_to_rot6d(rot6d_to_matrix(r6)), r6)
    noisy = rot6d_to_matrix(r6 * 3.0 + 0.01 * torch.randn(500, 6, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(500, 3, 3)
    torch.testing.assert_close(noisy @ noisy.transpose(-1, -2), eye)


# -- checkpoints ------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_outputs(policy: GR2Policy, tmp_path: Path) -> None:
    save_checkpoint(policy, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == policy.config and not loaded.training
    window = make_window(policy)
    assert max_diff(predict(policy, window), predict(loaded, window)) == 0.0
    assert model_hash(loaded) == model_hash(policy)
    assert len(model_hash(policy)) == 16


def test_a_checkpoint_written_before_lang_to_tokens_loads_as_before(
    policy: GR2Policy, tmp_path: Path
) -> None:
    """config.json files older than an added field (ADDED_FIELDS) load as the architecture
    they were written for; the field itself round-trips and adds one Linear."""
    save_checkpoint(policy, tmp_path / "old")
    _edit_config(tmp_path / "old", lambda d: d.pop("lang_to_tokens"))
    loaded = load_checkpoint(tmp_path / "old")
    assert loaded.config == policy.config and not loaded.config.lang_to_tokens
    assert loaded.gpt.image_lang is None and loaded.gpt.act_lang is None
    window = make_window(policy)
    assert max_diff(predict(policy, window), predict(loaded, window)) == 0.0
    conditioned = GR2Policy(GR2Config(lang_to_tokens=True, text_encoder="words"))
    save_checkpoint(conditioned, tmp_path / "new")
    again = load_checkpoint(tmp_path / "new")
    assert again.config.lang_to_tokens and again.config.text_encoder == "words"
    assert {"gpt.image_lang.weight", "gpt.act_lang.weight"} <= set(again.state_dict())
    assert not any(n.startswith("text_encoder.") for n in again.state_dict())


def test_model_hash_changes_with_any_weight(policy: GR2Policy) -> None:
    other = init_random_policy("gr2-tiny", 0)
    assert model_hash(other) == model_hash(policy)
    with torch.no_grad():
        other.action_head.out.bias[0] += 1e-6
    assert model_hash(other) != model_hash(policy)


def _edit_weights(directory: Path, edit) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def _edit_config(directory: Path, edit) -> None:
    data = json.loads((directory / "config.json").read_text())
    edit(data)
    (directory / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_dir", r"does not exist"),
        ("no_config", r"has no config\.json"),
        ("no_weights", r"has no model\.safetensors"),
        ("bad_json", r"config\.json is not valid JSON"),
        ("unknown_field", r"unknown config field\(s\): \['dropout'\]"),
        ("bad_value", r"invalid GR2Config: .*vq_downsample"),
        ("missing_tensor", r"missing tensors: action_head\.out\.bias"),
        ("unexpected_tensor", r"unexpected tensors: extra\.weight"),
        ("shape", r"gpt\.image_head\.weight: checkpoint \(512, 128\) vs config \(256, 128\)"),
        ("corrupt_weights", r"not a readable safetensors file"),
    ],
)
def test_checkpoint_errors_name_the_problem(
    policy: GR2Policy, tmp_path: Path, case: str, message: str
) -> None:
    directory = save_checkpoint(policy, tmp_path / "ckpt")
    if case == "no_dir":
        directory = tmp_path / "nowhere"
    elif case == "no_config":
        (directory / "config.json").unlink()
    elif case == "no_weights":
        (directory / "model.safetensors").unlink()
    elif case == "bad_json":
        (directory / "config.json").write_text("{not json")
    elif case == "unknown_field":
        _edit_config(directory, lambda d: d.update(dropout=0.1))
    elif case == "bad_value":
        _edit_config(directory, lambda d: d.update(vq_downsample=3))
    elif case == "missing_tensor":
        _edit_weights(directory, lambda t: t.pop("action_head.out.bias"))
    elif case == "unexpected_tensor":
        _edit_weights(directory, lambda t: t.update({"extra.weight": torch.zeros(2)}))
    elif case == "shape":  # a config that disagrees with the weights
        _edit_config(directory, lambda d: d.update(codebook_size=256))
    else:
        (directory / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(directory)
