"""Exact KV-cached decoding: the incremental step and the cached video generation equal the
full forward (over the whole episode, or its last R = L(h-1)+1 steps) to 1e-4 in fp32."""

from __future__ import annotations

import pytest
import torch
from gr2_policy.model import GR2Policy, init_random_policy
from gr2_policy.model.kv_cache import RollingKVCache
from gr2_policy.model.policy import ActionPrediction
from gr2_policy.model.rotations import quat_normalize
from gr2_policy.model.sampling import GREEDY, Sampling

from tests.support.models import lang_conditioned_policy

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["gr2-tiny", "gr2-small", "lang-conditioned"])
def policy(request: pytest.FixtureRequest) -> GR2Policy:
    if request.param == "lang-conditioned":
        return lang_conditioned_policy(seed=0)
    return init_random_policy(request.param, seed=0)


@pytest.fixture(scope="module")
def tiny() -> GR2Policy:
    return init_random_policy("gr2-tiny", seed=1)


def make_episode(policy: GR2Policy, n_steps: int, seed: int, batch: int = 1) -> dict:
    """Random token ids, states and a LANG embedding for an episode of n_steps."""
    cfg = policy.config
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(
        0, cfg.codebook_size, (batch, n_steps, len(cfg.views), cfg.tokens_per_view), generator=gen
    )
    states = torch.cat(
        (
            torch.rand(batch, n_steps, 3, generator=gen) * 0.5,
            quat_normalize(torch.randn(batch, n_steps, 4, generator=gen)),
            torch.rand(batch, n_steps, 1, generator=gen),
        ),
        dim=-1,
    )
    with torch.inference_mode():
        lang = policy.encode_instruction([f"pick up block {i}" for i in range(batch)])
    return {"lang": lang, "tokens": tokens, "states": states}


def action_diff(a: ActionPrediction, b: ActionPrediction) -> float:
    return max(
        float((a.positions - b.positions).abs().max()),
        float((a.quats_wxyz - b.quats_wxyz).abs().max()),
        float((a.grippers - b.grippers).abs().max()),
    )


def recompute(policy: GR2Policy, ep: dict, first: int, last: int, act_steps: str = "last"):
    """Full forward over steps first..last (inclusive), with the same mask: the [ACT]
    features (B, T_act, d), and the image logits of every step (B, T, V*N, K)."""
    out = policy(
        ep["lang"],
        ep["tokens"][:, first : last + 1],
        ep["states"][:, first : last + 1],
        first_step=first,
        act_steps=act_steps,
    )
    logits = policy.gpt.image_logits(out.hidden[:, :, : policy.config.image_tokens_per_step])
    return out.act, logits


def actions_of(policy: GR2Policy, feature: torch.Tensor, state: torch.Tensor) -> ActionPrediction:
    return policy.decode_actions(policy.action_head.decode(feature), state)


@torch.inference_mode()
def test_cached_steps_equal_full_forward_over_episode_and_last_r_steps(policy: GR2Policy) -> None:
    """An episode of R - 1 + 3h steps; over its last 3h steps (the window slides three
    times, and the R-step forward is a real truncation) the cached step equals a forward
    over the whole episode and one over the last R steps: [ACT] feature, actions, logits."""
    cfg = policy.config
    h, r = cfg.history, cfg.receptive_field
    n_steps = r - 1 + 3 * h
    ep = make_episode(policy, n_steps, seed=2)
    # One forward gives every step's [ACT] and logits: nothing attends to an [ACT].
    episode_act, episode_logits = recompute(policy, ep, 0, n_steps - 1, act_steps="all")
    cache = policy.new_cache()
    worst = {"episode": 0.0, "last_r": 0.0, "logits": 0.0}
    for t in range(n_steps):
        out = policy.step(
            cache, ep["lang"], ep["tokens"][:, t], ep["states"][:, t], want_image_logits=True
        )
        if t < r - 1:
            continue
        state = ep["states"][:, t]
        worst["episode"] = max(
            worst["episode"],
            float((out.act_feature - episode_act[:, t]).abs().max()),
            action_diff(out.actions, actions_of(policy, episode_act[:, t], state)),
        )
        worst["logits"] = max(
            worst["logits"], float((out.image_logits - episode_logits[:, t]).abs().max())
        )
        r_act, r_logits = recompute(policy, ep, t - r + 1, t)
        worst["last_r"] = max(
            worst["last_r"],
            float((out.act_feature - r_act[:, 0]).abs().max()),
            action_diff(out.actions, actions_of(policy, r_act[:, 0], state)),
            float((out.image_logits - r_logits[:, -1]).abs().max()),
        )
    print(f"{cfg.preset}: max |cached - recomputed| over the last {3 * h} steps: {worst}")
    assert all(value < TOLERANCE for value in worst.values()), worst


@torch.inference_mode()
def test_older_steps_flow_through_the_cache(tiny: GR2Policy) -> None:
    """The receptive field really is R > h: recomputing only the last h steps (GR-1 style)
    gives another answer, and so does changing a step older than h but within R."""
    cfg = tiny.config
    h, r = cfg.history, cfg.receptive_field
    t = r - 1  # the last step of an R-step episode
    ep = make_episode(tiny, r, seed=3)
    feature_r = recompute(tiny, ep, 0, t)[0]
    feature_h = recompute(tiny, ep, t - h + 1, t)[0]
    assert float((feature_r - feature_h).abs().max()) > 1e-3
    changed = {**ep, "tokens": ep["tokens"].clone()}
    changed["tokens"][:, 0] = (changed["tokens"][:, 0] + 1) % cfg.codebook_size  # R-1 ago
    assert float((recompute(tiny, changed, 0, t)[0] - feature_r).abs().max()) > 1e-6
    longer = make_episode(tiny, r + 1, seed=3)  # one step older than R: no influence
    longer["lang"] = ep["lang"]
    longer["tokens"][:, 1:], longer["states"][:, 1:] = ep["tokens"], ep["states"]
    feature_longer = recompute(tiny, longer, 0, r)[0]
    assert float((feature_longer - feature_r).abs().max()) < TOLERANCE


@torch.inference_mode()
def test_batched_cache_with_episodes_at_different_steps(tiny: GR2Policy) -> None:
    """Two episodes in one cache, the second started two steps later: each equals its
    own single-episode run (slots and positions are per episode)."""
    ep = make_episode(tiny, 8, seed=4, batch=2)
    singles = []
    for item in range(2):
        cache = tiny.new_cache()
        steps = range(8) if item == 0 else range(6)
        lang = ep["lang"][item : item + 1]
        singles.append(
            [
                tiny.step(
                    cache, lang, ep["tokens"][item : item + 1, t], ep["states"][item : item + 1, t]
                ).act_feature
                for t in steps
            ]
        )
    cache = tiny.new_cache(batch=2)
    first = tiny.new_cache()  # episode 0's first two steps, then merge into the batch
    for t in range(2):
        tiny.step(first, ep["lang"][:1], ep["tokens"][:1, t], ep["states"][:1, t])
    cache.k[:, 0], cache.v[:, 0] = first.k[:, 0], first.v[:, 0]
    cache.key_step[0], cache.key_pos[0] = first.key_step[0], first.key_pos[0]
    cache.next_step[0] = 2
    for t in range(6):
        out = tiny.step(
            cache,
            ep["lang"],
            torch.stack((ep["tokens"][0, t + 2], ep["tokens"][1, t])),
            torch.stack((ep["states"][0, t + 2], ep["states"][1, t])),
        )
        torch.testing.assert_close(out.act_feature[0], singles[0][t + 2][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.act_feature[1], singles[1][t][0], atol=1e-5, rtol=0)


def _cache_state(cache: RollingKVCache) -> list[torch.Tensor]:
    body = slice(0, cache.scratch)  # the [ACT] scratch slot is rewritten by every step
    return [
        cache.k[..., body, :].clone(),
        cache.v[..., body, :].clone(),
        cache.key_step[:, body].clone(),
        cache.key_pos[:, body].clone(),
        cache.next_step.clone(),
    ]


@torch.inference_mode()
@pytest.mark.parametrize("sampling", [GREEDY, Sampling(greedy=False, top_k=20, seed=7)])
@pytest.mark.parametrize("conditioned", [False, True], ids=["plain", "lang-conditioned"])
def test_generation_with_cache_equals_generation_without(
    tiny: GR2Policy, sampling: Sampling, conditioned: bool
) -> None:
    if conditioned:
        tiny = lang_conditioned_policy(seed=1)
    cfg = tiny.config
    n_steps = 2 * cfg.history + 1  # the cache has wrapped: generation overwrites live slots
    ep = make_episode(tiny, n_steps, seed=5)
    cache = tiny.new_cache()
    for t in range(n_steps):
        tiny.step(cache, ep["lang"], ep["tokens"][:, t], ep["states"][:, t])
    before = _cache_state(cache)
    cached = tiny.generate_frames(cache, ep["lang"], num_frames=2, sampling=sampling)
    assert cached.shape == (1, 2, len(cfg.views), cfg.tokens_per_view)
    for saved, now in zip(before, _cache_state(cache), strict=True):
        assert torch.equal(saved, now)  # rolled back exactly
    uncached = tiny.generate_frames_uncached(
        ep["lang"], ep["tokens"], ep["states"], None, 0, num_frames=2, sampling=sampling
    )
    assert torch.equal(cached, uncached)
    assert cached.unique().numel() > 10  # not a degenerate constant frame
    again = tiny.generate_frames(cache, ep["lang"], num_frames=2, sampling=sampling)
    assert torch.equal(again, cached)  # same seed, same frames
    # The real next step after generating equals the one without generating.
    fresh = tiny.new_cache()
    for t in range(n_steps):
        tiny.step(fresh, ep["lang"], ep["tokens"][:, t], ep["states"][:, t])
    nxt = make_episode(tiny, 1, seed=6)
    a = tiny.step(cache, ep["lang"], nxt["tokens"][:, 0], nxt["states"][:, 0])
    b = tiny.step(fresh, ep["lang"], nxt["tokens"][:, 0], nxt["states"][:, 0])
    assert torch.equal(a.act_feature, b.act_feature)


@torch.inference_mode()
def test_first_generated_token_logits_equal_the_full_forward(tiny: GR2Policy) -> None:
    """The logits of the first imagined token come from [LANG] of step t+1: the same as a
    full forward over the episode extended by a step (whose tokens cannot matter yet)."""
    ep = make_episode(tiny, 6, seed=8)
    cache = tiny.new_cache()
    for t in range(5):
        tiny.step(cache, ep["lang"], ep["tokens"][:, t], ep["states"][:, t])
    hidden, _ = tiny.gpt.forward_cached(
        ep["lang"][:, None], cache, cache.next_step, 0, with_act=False
    )
    out = tiny(ep["lang"], ep["tokens"], ep["states"])
    expected = tiny.gpt.image_logits(out.hidden[:, 5, 0])
    diff = (tiny.gpt.image_logits(hidden[:, 0]) - expected).abs().max()
    assert float(diff) < TOLERANCE


def test_generation_rejects_zero_frames(tiny: GR2Policy) -> None:
    cache = tiny.new_cache()
    lang = torch.zeros(1, tiny.config.d_model)
    with pytest.raises(ValueError, match="num_frames"):
        tiny.generate_frames(cache, lang, num_frames=0, sampling=GREEDY)


def test_sampling_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="top_k"):
        Sampling(greedy=False, top_k=-1)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(greedy=False, temperature=0.0)


@torch.inference_mode()
@pytest.mark.parametrize("preset", ["gr2-tiny", "gr2-small", "gr2-base"])
def test_generate_two_frames_of_two_views_for_every_preset(preset: str) -> None:
    """Real weights (random), real sizes: a step from camera images, then 2 imagined frames
    of both views decoded to pixels. gr2-base's CLIP needs a tokenizer from a CLIP
    directory, so its LANG embedding is given directly."""
    model = init_random_policy(preset, seed=0)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    size, n_views = cfg.image_size, len(cfg.views)
    images = torch.randint(0, 256, (1, n_views, size, size, 3), generator=gen).to(torch.uint8)
    if cfg.text_encoder == "byte":
        lang = model.encode_instruction(["put the red block in the bowl"])
    else:
        lang = model.gpt.project_language(torch.randn(1, cfg.text_embed_dim, generator=gen))
    state = torch.tensor([[0.4, 0.0, 0.3, 0.0, 1.0, 0.0, 0.0, 0.0]])
    cache = model.new_cache()
    tokens = model.tokenize_images(images)
    out = model.step(cache, lang, tokens, state)
    assert out.actions is not None and torch.isfinite(out.actions.positions).all()
    ids = model.generate_frames(cache, lang, num_frames=2, sampling=GREEDY)
    assert ids.shape == (1, 2, n_views, cfg.tokens_per_view)
    assert int(ids.min()) >= 0 and int(ids.max()) < cfg.codebook_size
    pixels = model.decode_frames(ids)
    assert pixels.shape == (1, 2, n_views, size, size, 3) and pixels.dtype == torch.uint8
    assert int(cache.next_step[0]) == 1  # rolled back: still after the one real step
