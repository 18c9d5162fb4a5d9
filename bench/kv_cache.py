"""KV-cached decoding against recomputation, per preset: control steps and video tokens.

For each preset (random weights; speed does not depend on their values) it runs one episode
and measures, at steady state (the window full, the cache wrapped):

- the cached step (``GR2Policy.step``: the new step's P tokens + [ACT] against the cache);
- the exact recompute of the last R = L(h-1)+1 steps (what GR2_KV_CACHE=off does; the same
  answer, checked here as max |diff|);
- the GR-1-style recompute of the last h steps (a different, window-relative answer: the
  baseline a user would otherwise build);
- video generation of one frame of every view, token by token, with the cache and without
  it (every token recomputes the last R steps), as tokens per second.

Image tokenisation (the VQGAN encoder) is identical in all variants and is left out; its
time is reported separately. Prints one JSON document; ratios are X / cached.

    python bench/kv_cache.py --presets gr2-tiny gr2-small [--device cuda] [--threads 2]
    python bench/kv_cache.py --presets gr2-tiny --override vq_downsample=4 \\
        --override "vq_channel_mult=[1,2,4]"   # 4x4-pixel patches (README, "Why green")
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch
from gr2_policy.model import GR2Policy, init_random_policy
from gr2_policy.model.sampling import GREEDY
from gr2_training.train.cli import parse_override


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1e3
    return {f"p{q}_ms": round(float(np.percentile(arr, q)), 3) for q in (50, 90)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


@torch.inference_mode()
def bench_preset(
    preset: str, device: torch.device, steps: int, overrides: dict, seed: int = 0
) -> dict:
    model: GR2Policy = init_random_policy(preset, seed, **overrides).to(device)
    cfg = model.config
    h, r = cfg.history, cfg.receptive_field
    warm = r + h  # steady state: the window is full and the cache has wrapped
    total = warm + steps
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(
        0, cfg.codebook_size, (1, total, len(cfg.views), cfg.tokens_per_view), generator=gen
    ).to(device)
    states = torch.zeros(1, total, cfg.state_dim)
    states[..., :3] = torch.rand(1, total, 3, generator=gen) * 0.5
    states[..., 4] = 1.0  # a unit quaternion
    states = states.to(device)
    lang = model.gpt.project_language(torch.randn(1, cfg.text_embed_dim, generator=gen).to(device))

    images = torch.randint(
        0, 256, (1, len(cfg.views), cfg.image_size, cfg.image_size, 3), generator=gen
    ).to(device, torch.uint8)
    for _ in range(3):
        model.tokenize_images(images)
    tokenize_s = [timed(lambda: model.tokenize_images(images), device)[0] for _ in range(20)]

    cache = model.new_cache()
    cached, recompute_r, recompute_h, max_diff = [], [], [], 0.0
    for t in range(total):
        dt, out = timed(
            lambda t=t: model.step(cache, lang, tokens[:, t], states[:, t]).actions, device
        )
        if t < warm:
            continue
        cached.append(dt)
        first = t - r + 1
        dt_r, exact = timed(
            lambda t=t, first=first: model.predict_actions(
                lang, tokens[:, first : t + 1], states[:, first : t + 1], first_step=first
            ),
            device,
        )
        recompute_r.append(dt_r)
        max_diff = max(max_diff, float((exact.positions - out.positions).abs().max()))
        dt_h, _ = timed(
            lambda t=t: model.predict_actions(
                lang, tokens[:, t - h + 1 : t + 1], states[:, t - h + 1 : t + 1]
            ),
            device,
        )
        recompute_h.append(dt_h)

    frame_tokens = cfg.image_tokens_per_step
    model.generate_frames(cache, lang, 1, GREEDY)  # warm-up
    gen_cached_s, ids = timed(lambda: model.generate_frames(cache, lang, 1, GREEDY), device)
    first = total - (r - 1)
    gen_uncached_s, ids_uncached = timed(
        lambda: model.generate_frames_uncached(
            lang, tokens[:, first:], states[:, first:], None, first, 1, GREEDY
        ),
        device,
    )
    cached_p50 = float(np.median(cached))
    return {
        "preset": preset,
        "overrides": overrides,
        "history_h": h,
        "receptive_field_R": r,
        "tokens_per_step": cfg.tokens_per_step,
        "kv_cache_bytes_per_episode": cache.nbytes,
        "steps_measured": steps,
        "tokenize_images": percentiles(tokenize_s),
        "cached_step": percentiles(cached),
        "recompute_last_R_steps": percentiles(recompute_r),
        "recompute_last_h_steps_gr1": percentiles(recompute_h),
        "ratio_recompute_R_over_cached": round(float(np.median(recompute_r)) / cached_p50, 2),
        "ratio_recompute_h_over_cached": round(float(np.median(recompute_h)) / cached_p50, 2),
        "max_abs_diff_cached_vs_recompute_R": max_diff,
        "video": {
            "frame_tokens": frame_tokens,
            "cached_tokens_per_s": round(frame_tokens / gen_cached_s, 1),
            "uncached_tokens_per_s": round(frame_tokens / gen_uncached_s, 2),
            "ratio_cached_over_uncached": round(gen_uncached_s / gen_cached_s, 1),
            "same_tokens": bool(torch.equal(ids, ids_uncached)),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["gr2-tiny", "gr2-small"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--steps", type=int, default=20, help="steady-state steps measured")
    parser.add_argument(
        "--override",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="change one GR2Config field of every preset (repeatable)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for preset in args.presets:
        print(f"[bench] {preset} on {device} ...", flush=True, file=sys.stderr)
        try:
            results.append(bench_preset(preset, device, args.steps, dict(args.override)))
        except (TypeError, ValueError) as err:
            parser.error(f"--override {dict(args.override)}: {err}")
    print(
        json.dumps(
            {
                "benchmark": "kv_cache",
                "device": str(device),
                "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "dtype": "float32",
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
