"""TensorRT runner: the pure parts (cache key, per-bucket profile shapes, profile choice,
availability) everywhere; an engine build and parity with eager on a CUDA GPU with TensorRT."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from gr2_policy.engine.kv_pool import KVCachePool
from gr2_policy.engine.runners import RunnerUnavailableError, StepInputs, make_runner
from gr2_policy.engine.runners.onnx_runtime import ONNX_INPUTS
from gr2_policy.engine.runners.tensorrt import (
    TRT_REQUIREMENT,
    TensorRTRunner,
    availability_problem,
    engine_cache_path,
    normalize_buckets,
    profile_index,
    profile_shapes,
)
from gr2_policy.model import GR2Policy, init_random_policy
from gr2_policy.model.step_function import StepFunction, step_layout

from tests.support.runner_parity import cosine, episode_inputs, reference_actions, runner_actions

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
TRT_PROBLEM = availability_problem(
    CUDA, cuda_available=torch.cuda.is_available(), tensorrt_found=HAS_TRT
)


@pytest.fixture(scope="module")
def policy() -> GR2Policy:
    return init_random_policy("gr2-tiny", seed=0).eval()


def example_inputs(policy: GR2Policy, device: torch.device = CPU) -> StepInputs:
    """A batch-1 step 0 on an empty cache (the shapes ``prepare`` takes)."""
    cfg = policy.config
    pool = KVCachePool(cfg, 1, device=device, dtype=torch.float32)
    past_k, past_v, key_step, key_pos = pool.gather(
        torch.zeros(1, dtype=torch.long, device=device), torch.float32
    )
    mask, rope = step_layout(
        cfg, torch.zeros(1, dtype=torch.long, device=device), key_step, key_pos
    )
    tokens = torch.zeros(1, len(cfg.views) * cfg.tokens_per_view, dtype=torch.long, device=device)
    lang = torch.zeros(1, cfg.d_model, device=device)
    return StepInputs(
        past_k, past_v, mask, rope, lang, tokens, torch.zeros(1, cfg.state_dim, device=device)
    )


def test_cache_path_names_everything_the_engine_depends_on(tmp_path: Path) -> None:
    path = engine_cache_path(
        tmp_path,
        model_hash="2c751fd151a2983e",
        compute_capability=(9, 0),
        trt_version="10.13.0",
        precision="fp16",
        buckets=(8, 1, 4, 2),
    )
    assert path == tmp_path / "step-2c751fd151a2983e-sm90-trt10.13.0-fp16-b1-2-4-8.plan"
    base = {
        "model_hash": "2c751fd151a2983e",
        "compute_capability": (9, 0),
        "trt_version": "10.13.0",
        "precision": "fp16",
        "buckets": (1, 2, 4, 8),
    }
    changes = {
        "model_hash": "ffff",
        "compute_capability": (8, 9),
        "trt_version": "10.14.1",
        "precision": "bf16",
        "buckets": (1, 2, 4),
    }
    for key, value in changes.items():
        assert engine_cache_path(tmp_path, **{**base, key: value}) != path, key  # type: ignore[arg-type]


def test_profile_shapes_put_each_bucket_on_the_inputs_batch_axis(policy: GR2Policy) -> None:
    cfg = policy.config
    example = example_inputs(policy)
    shapes = {name: tuple(t.shape) for name, t in zip(ONNX_INPUTS, example.as_tuple(), strict=True)}
    profiles = profile_shapes(shapes, (4, 1, 16))
    assert len(profiles) == 3
    dh = cfg.d_model // cfg.n_heads
    s = cfg.history * cfg.tokens_per_step
    p1 = cfg.tokens_per_step + 1
    for bucket, profile in zip((1, 4, 16), profiles, strict=True):
        assert profile["past_k"] == (cfg.n_layers, bucket, cfg.n_heads, s, dh)
        assert profile["past_v"] == profile["past_k"]
        assert profile["mask"] == (bucket, 1, p1, s + p1)
        assert profile["rope"] == (2, bucket, p1, dh // 2)
        assert profile["lang"] == (bucket, cfg.d_model)
        assert profile["image_tokens"] == (bucket, len(cfg.views) * cfg.tokens_per_view)
        assert profile["state"] == (bucket, cfg.state_dim)


def test_profile_index_is_the_bucket_position() -> None:
    buckets = (8, 1, 2, 4, 32, 16)
    assert [profile_index(b, buckets) for b in (1, 2, 4, 8, 16, 32)] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("batch", [0, 3, 5, 33])
def test_a_batch_that_is_not_a_bucket_is_refused(batch: int) -> None:
    with pytest.raises(ValueError, match="not a bucket"):
        profile_index(batch, (1, 2, 4, 8, 16, 32))


def test_buckets_are_sorted_unique_and_positive() -> None:
    assert normalize_buckets([4, 1, 4, 2]) == (1, 2, 4)
    with pytest.raises(ValueError):
        normalize_buckets([0, 1])
    with pytest.raises(ValueError):
        normalize_buckets([])


def test_availability_names_what_is_missing() -> None:
    cuda = torch.device("cuda", 0)
    assert availability_problem(cuda, cuda_available=True, tensorrt_found=True) is None
    no_gpu = availability_problem(cuda, cuda_available=False, tensorrt_found=True)
    assert (
        no_gpu is not None and "no CUDA GPU" in no_gpu and "tensorrt` package is not" not in no_gpu
    )
    no_trt = availability_problem(cuda, cuda_available=True, tensorrt_found=False)
    assert (
        no_trt is not None
        and "tensorrt` package is not installed" in no_trt
        and "no CUDA" not in no_trt
    )
    on_cpu = availability_problem(CPU, cuda_available=True, tensorrt_found=True)
    assert on_cpu is not None and "not cuda" in on_cpu
    for problem in (no_gpu, no_trt, on_cpu):
        assert problem.startswith(TRT_REQUIREMENT)


@pytest.mark.skipif(TRT_PROBLEM is None, reason="this machine can run TensorRT")
@pytest.mark.parametrize("device", [CPU, CUDA])
def test_make_runner_here_says_what_is_missing(policy: GR2Policy, device: torch.device) -> None:
    with pytest.raises(RunnerUnavailableError) as caught:
        make_runner("tensorrt", StepFunction(policy), device=device)
    message = str(caught.value)
    assert "pip install tensorrt-cu13" in message
    if not HAS_TRT:
        assert "`tensorrt` package is not installed" in message
    if device.type == "cuda" and not torch.cuda.is_available():
        assert "no CUDA GPU" in message


@pytest.mark.gpu
@pytest.mark.skipif(TRT_PROBLEM is not None, reason=str(TRT_PROBLEM))
def test_cuda_parity_with_eager_and_a_cached_plan(policy: GR2Policy, tmp_path: Path) -> None:
    on_gpu = (
        init_random_policy("gr2-tiny", seed=0).eval().to(CUDA)
    )  # runner_actions moves the model
    runner = make_runner(
        "tensorrt",
        StepFunction(on_gpu),
        device=CUDA,
        buckets=(1, 4),
        cache_dir=tmp_path,
        model_hash="gpu",
    )
    assert isinstance(runner, TensorRTRunner)
    runner.prepare(example_inputs(on_gpu, CUDA))
    first_steps = [0, 7, 1000]
    tokens, states = episode_inputs(policy, 30, 3)
    ref = reference_actions(policy, tokens, states, first_steps)
    got = runner_actions(on_gpu, runner, tokens, states, first_steps, device=CUDA)  # padded to 4
    assert cosine(ref, got) >= 0.999

    built = runner.path.stat().st_mtime_ns
    again = TensorRTRunner(
        StepFunction(on_gpu), device=CUDA, buckets=(1, 4), cache_dir=tmp_path, model_hash="gpu"
    )
    again.prepare(example_inputs(on_gpu, CUDA))
    assert again.path == runner.path and runner.path.stat().st_mtime_ns == built
