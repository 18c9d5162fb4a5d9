"""ONNX runner over a real gr2-tiny export and real ONNX Runtime: parity with the eager
in-place step, dynamic batch, the on-disk export cache, precision errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gr2_policy.engine.kv_pool import KVCachePool
from gr2_policy.engine.runners import RunnerUnavailableError, StepInputs, make_runner
from gr2_policy.engine.runners.onnx_runtime import (
    ONNX_INPUTS,
    OnnxRunner,
    default_cache_dir,
    onnx_path,
    widen,
)
from gr2_policy.model import GR2Policy, init_random_policy, model_hash
from gr2_policy.model.step_function import StepFunction, step_layout

from tests.support.runner_parity import cosine, episode_inputs, reference_actions, runner_actions

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def step_inputs(
    policy: GR2Policy, batch: int, *, seed: int, device: torch.device = CPU
) -> StepInputs:
    """A batch at steps seed..seed+batch-1 over random cached keys (every slot written)."""
    cfg = policy.config
    g = torch.Generator().manual_seed(seed)
    pool = KVCachePool(cfg, batch, device=device, dtype=torch.float32)
    rows = torch.arange(batch, device=device)
    steps = torch.arange(seed, seed + batch, device=device) + cfg.history
    for back in range(cfg.history, 0, -1):
        shape = (cfg.n_layers, batch, cfg.n_heads, cfg.tokens_per_step, cfg.d_model // cfg.n_heads)
        pool.write(
            rows,
            steps - back,
            torch.randn(shape, generator=g).to(device),
            torch.randn(shape, generator=g).to(device),
        )
    past_k, past_v, key_step, key_pos = pool.gather(rows, torch.float32)
    mask, rope = step_layout(cfg, steps, key_step, key_pos)
    tokens = torch.randint(
        0, cfg.codebook_size, (batch, len(cfg.views) * cfg.tokens_per_view), generator=g
    )
    return StepInputs(
        past_k,
        past_v,
        mask,
        rope,
        torch.randn(batch, cfg.d_model, generator=g).to(device),
        tokens.to(device),
        torch.randn(batch, cfg.state_dim, generator=g).to(device),
    )


@pytest.fixture(scope="module")
def policy() -> GR2Policy:
    return init_random_policy("gr2-tiny", seed=0).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def runner(policy: GR2Policy, cache_dir: Path) -> OnnxRunner:
    """One export + session for the module (the export takes ~10 s)."""
    runner = make_runner(
        "onnx", StepFunction(policy), device=CPU, cache_dir=cache_dir, model_hash=model_hash(policy)
    )
    assert isinstance(runner, OnnxRunner)
    runner.prepare(step_inputs(policy, 1, seed=0))
    return runner


def test_parity_with_eager_over_an_episode(policy: GR2Policy, runner: OnnxRunner) -> None:
    first_steps = [0, 7, 1000]
    tokens, states = episode_inputs(policy, 30, 3)
    ref = reference_actions(policy, tokens, states, first_steps)
    got = runner_actions(policy, runner, tokens, states, first_steps)
    assert cosine(ref, got) >= 0.999
    assert np.abs(ref.flat() - got.flat()).max() < 1e-4


def test_single_episode_parity(policy: GR2Policy, runner: OnnxRunner) -> None:
    # 8 steps: past the 4-step history window, so the ring buffer wraps
    tokens, states = episode_inputs(policy, 8, 1, seed=1)
    ref = reference_actions(policy, tokens, states, [3])
    got = runner_actions(policy, runner, tokens, states, [3])
    assert np.abs(ref.flat() - got.flat()).max() < 1e-4


@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_dynamic_batch_matches_the_step_function(
    policy: GR2Policy, runner: OnnxRunner, batch: int
) -> None:
    inputs = step_inputs(policy, batch, seed=10 + batch)
    got = runner.run(inputs)
    with torch.inference_mode():
        raw, new_k, new_v = StepFunction(policy)(*inputs.as_tuple())
    assert got.raw.shape == raw.shape == (batch, policy.config.action_horizon, 10)
    assert got.new_k.shape == new_k.shape and got.new_k.shape[1] == batch
    assert got.raw.dtype == torch.float32
    for a, b in ((got.raw, raw), (got.new_k, new_k), (got.new_v, new_v)):
        assert (a - b).abs().max().item() < 1e-4


def test_a_second_runner_reuses_the_cached_export(
    policy: GR2Policy, runner: OnnxRunner, cache_dir: Path
) -> None:
    before = runner.path.stat().st_mtime_ns
    again = OnnxRunner(
        StepFunction(policy), device=CPU, cache_dir=cache_dir, model_hash=runner.model_hash
    )
    assert again.path == runner.path
    again.prepare(step_inputs(policy, 1, seed=0))
    assert runner.path.stat().st_mtime_ns == before
    assert sorted(p.name for p in cache_dir.iterdir()) == [runner.path.name]  # no temp files left


def test_the_cache_file_is_keyed_by_model_and_precision(cache_dir: Path) -> None:
    a = onnx_path(cache_dir, "aaaa", "fp32")
    assert a == cache_dir / "step-aaaa-fp32.onnx"
    assert onnx_path(cache_dir, "bbbb", "fp32") != a
    assert onnx_path(cache_dir, "aaaa", "fp16") != a


def test_a_different_model_hash_gives_a_different_file(
    policy: GR2Policy, runner: OnnxRunner, cache_dir: Path
) -> None:
    other = OnnxRunner(
        StepFunction(policy), device=CPU, cache_dir=cache_dir, model_hash="0123456789abcdef"
    )
    assert other.path != runner.path
    assert not other.path.exists()  # nothing exported until prepare


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "gr2" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "gr2" / "engines"


def test_widen_repeats_along_each_batch_axis(policy: GR2Policy) -> None:
    one = step_inputs(policy, 1, seed=0)
    four = widen(one, 4)
    assert four.batch == 4
    for name, small, big in zip(ONNX_INPUTS, one.as_tuple(), four.as_tuple(), strict=True):
        axis = 1 if name in ("past_k", "past_v", "rope") else 0
        assert big.shape[axis] == 4
        assert torch.equal(big.select(axis, 3), small.select(axis, 0))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cpu_is_unavailable(policy: GR2Policy, precision: str) -> None:
    with pytest.raises(RunnerUnavailableError, match="fp32 only"):
        make_runner("onnx", StepFunction(policy), device=CPU, precision=precision)


def test_run_before_prepare_is_an_error(policy: GR2Policy, cache_dir: Path) -> None:
    fresh = OnnxRunner(StepFunction(policy), device=CPU, cache_dir=cache_dir, model_hash="x")
    with pytest.raises(RuntimeError, match="prepare"):
        fresh.run(step_inputs(policy, 1, seed=0))


def test_missing_onnxruntime_says_what_to_install(
    policy: GR2Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(RunnerUnavailableError, match="pip install onnxruntime"):
        make_runner("onnx", StepFunction(policy), device=CPU)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_parity_with_eager(policy: GR2Policy, tmp_path: Path, precision: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    cuda = torch.device("cuda")
    on_gpu = (
        init_random_policy("gr2-tiny", seed=0).eval().to(cuda)
    )  # runner_actions moves the model
    runner = make_runner(
        "onnx",
        StepFunction(on_gpu),
        device=cuda,
        precision=precision,
        cache_dir=tmp_path,
        model_hash="gpu",
    )
    compute = torch.float16 if precision == "fp16" else torch.float32
    runner.prepare(step_inputs(on_gpu, 1, seed=0, device=cuda))
    first_steps = [0, 7, 1000]
    tokens, states = episode_inputs(policy, 30, 3)
    ref = reference_actions(policy, tokens, states, first_steps)
    got = runner_actions(
        on_gpu, runner, tokens, states, first_steps, device=cuda, compute_dtype=compute
    )
    assert cosine(ref, got) >= 0.999


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_unavailable(policy: GR2Policy) -> None:
    with pytest.raises(RunnerUnavailableError, match="CUDA"):
        make_runner("onnx", StepFunction(policy), device=torch.device("cuda"))
