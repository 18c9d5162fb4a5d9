"""The explicit-cache step function through the eager runner and a KVCachePool equals the
in-place cached step (DESIGN.md section 4): fp32 exactly (to 1e-4), padded batches, cache
storage in bf16/fp8, and on a GPU the CUDA eager runner in fp32 and bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gr2_policy.engine.runners import make_runner
from gr2_policy.model import GR2Policy, init_random_policy
from gr2_policy.model.step_function import StepFunction

from tests.support.models import lang_conditioned_policy
from tests.support.runner_parity import (
    EpisodeActions,
    aligned,
    cosine,
    episode_inputs,
    reference_actions,
    runner_actions,
)

FIRST_STEPS = [0, 7, 1000]
STEPS = 30


@pytest.fixture(scope="module")
def policy() -> GR2Policy:
    return init_random_policy("gr2-tiny", seed=0).eval()


@pytest.fixture(scope="module")
def episode(policy: GR2Policy) -> tuple[torch.Tensor, torch.Tensor, EpisodeActions]:
    tokens, states = episode_inputs(policy, STEPS, len(FIRST_STEPS))
    return tokens, states, reference_actions(policy, tokens, states, FIRST_STEPS)


def max_abs(a: EpisodeActions, b: EpisodeActions) -> float:
    return float(np.abs(a.flat() - aligned(a, b).flat()).max())


@pytest.mark.parametrize("buckets", [None, (4,)], ids=["exact", "padded"])
def test_eager_runner_equals_the_in_place_step(
    policy: GR2Policy, episode: tuple, buckets: tuple[int, ...] | None
) -> None:
    tokens, states, expected = episode
    runner = make_runner("eager", StepFunction(policy), device=torch.device("cpu"))
    runner.buckets = buckets  # padded: the third row pads a batch of 3 up to 4
    got = runner_actions(policy, runner, tokens, states, FIRST_STEPS)
    assert max_abs(got, expected) < 1e-4
    assert cosine(got, expected) >= 0.999


def test_eager_runner_keeps_parity_with_language_on_the_tokens() -> None:
    conditioned = lang_conditioned_policy(seed=0)
    tokens, states = episode_inputs(conditioned, STEPS, len(FIRST_STEPS))
    expected = reference_actions(conditioned, tokens, states, FIRST_STEPS)
    runner = make_runner("eager", StepFunction(conditioned), device=torch.device("cpu"))
    got = runner_actions(conditioned, runner, tokens, states, FIRST_STEPS)
    assert max_abs(got, expected) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_low_precision_cache_storage_keeps_parity(
    policy: GR2Policy, episode: tuple, dtype: torch.dtype
) -> None:
    tokens, states, expected = episode
    runner = make_runner("eager", StepFunction(policy), device=torch.device("cpu"))
    got = runner_actions(policy, runner, tokens, states, FIRST_STEPS, cache_dtype=dtype)
    print(f"{dtype}: cosine {cosine(got, expected):.7f} max abs {max_abs(got, expected):.2e}")
    assert cosine(got, expected) >= 0.999
    assert max_abs(got, expected) > 0  # really stored in another type


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_eager_runner_keeps_parity(policy: GR2Policy, episode: tuple, precision: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tokens, states, expected = episode
    gpu_policy = init_random_policy("gr2-tiny", seed=0).eval().cuda()
    runner = make_runner(
        "eager", StepFunction(gpu_policy), device=torch.device("cuda"), precision=precision
    )
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    got = runner_actions(
        gpu_policy, runner, tokens, states, FIRST_STEPS, device="cuda", compute_dtype=dtype
    )
    print(f"cuda {precision}: cosine {cosine(got, expected):.7f}")
    assert cosine(got, expected) >= 0.999
