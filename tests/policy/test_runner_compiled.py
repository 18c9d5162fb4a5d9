"""The torch.compile runner: parity with the eager cached step over a 30-step episode (CPU,
and CUDA graphs on a GPU), bucket enforcement, and refusing what it cannot run.

Real torch.compile throughout. The CPU compile (~40 s cold on 2 cores, seconds with a warm
inductor cache) is done once for the module, for a single bucket.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from gr2_policy.engine.kv_pool import KVCachePool
from gr2_policy.engine.runners import RunnerUnavailableError, StepInputs, make_runner
from gr2_policy.engine.runners.compiled import CompiledRunner, repeat_batch, toolchain_problem
from gr2_policy.model import GR2Policy, init_random_policy
from gr2_policy.model.step_function import StepFunction, step_layout
from torch._dynamo.utils import counters

from tests.support.runner_parity import (
    INSTRUCTIONS,
    cosine,
    episode_inputs,
    reference_actions,
    runner_actions,
)

CPU = torch.device("cpu")
FIRST_STEPS = [0, 7, 1000]
CPU_PROBLEM = toolchain_problem(CPU)
needs_cpu_compiler = pytest.mark.skipif(
    CPU_PROBLEM is not None, reason=f"torch.compile cannot build here: {CPU_PROBLEM}"
)


def example_inputs(model: GR2Policy, device: torch.device) -> StepInputs:
    """A batch-1 step at episode step 0 from an empty pool row (``model`` on ``device``)."""
    cfg = model.config
    pool = KVCachePool(cfg, 1, device=device, dtype=torch.float32)
    step = torch.zeros(1, dtype=torch.long, device=device)
    past_k, past_v, key_step, key_pos = pool.gather(step, torch.float32)  # row 0
    mask, rope = step_layout(cfg, step, key_step, key_pos)
    with torch.inference_mode():
        lang = model.encode_instruction([INSTRUCTIONS[0]]).to(device)
    tokens, states = episode_inputs(model, 1, 1)
    return StepInputs(
        past_k, past_v, mask, rope, lang, tokens[0].reshape(1, -1).to(device), states[0].to(device)
    )


@pytest.fixture(scope="module")
def model() -> GR2Policy:
    return init_random_policy("gr2-tiny", seed=0).eval()


@pytest.fixture(scope="module")
def cpu_runner(model: GR2Policy) -> Iterator[CompiledRunner]:
    if CPU_PROBLEM is not None:
        pytest.skip(f"torch.compile cannot build here: {CPU_PROBLEM}")
    runner = make_runner("compile", StepFunction(model), device=CPU, buckets=(4,))
    assert isinstance(runner, CompiledRunner)
    runner.prepare(example_inputs(model, CPU))
    yield runner


@needs_cpu_compiler
def test_cpu_parity_with_padding(model: GR2Policy, cpu_runner: CompiledRunner) -> None:
    # 3 episodes padded to the bucket of 4, at steps that exercise an empty cache (0), a
    # partly filled one (7 -> wraps the h-step window) and a long-running episode (1000).
    tokens, states = episode_inputs(model, 30, 3)
    ref = reference_actions(model, tokens, states, FIRST_STEPS)
    got = runner_actions(model, cpu_runner, tokens, states, FIRST_STEPS)
    assert cosine(ref, got) >= 0.999
    assert np.abs(ref.flat() - got.flat()).max() < 1e-4


@needs_cpu_compiler
def test_cpu_runs_without_recompiling(model: GR2Policy, cpu_runner: CompiledRunner) -> None:
    assert set(cpu_runner.compile_s) == {4}
    graphs = counters["stats"]["unique_graphs"]
    # Inference tensors (as the engine builds them) and ordinary, non-contiguous ones (which
    # the runner copies) replay the bucket's graph: run raises on a recompile.
    with torch.inference_mode():
        fast = repeat_batch(example_inputs(model, CPU), 4)
    slow = repeat_batch(example_inputs(model, CPU), 4)
    slow.lang = slow.lang.t().contiguous().t()
    assert not slow.lang.is_contiguous()
    outs = [cpu_runner.run(fast), cpu_runner.run(slow)]
    assert counters["stats"]["unique_graphs"] == graphs
    cfg = model.config
    for out in outs:
        assert out.raw.shape == (4, cfg.action_horizon, 10)
        assert out.raw.dtype == torch.float32
        assert out.new_k.shape == (
            cfg.n_layers,
            4,
            cfg.n_heads,
            cfg.tokens_per_step,
            cfg.d_model // cfg.n_heads,
        )
    torch.testing.assert_close(outs[0].raw, outs[1].raw)


@needs_cpu_compiler
def test_batch_that_is_not_a_bucket_is_refused(
    model: GR2Policy, cpu_runner: CompiledRunner
) -> None:
    inputs = repeat_batch(example_inputs(model, CPU), 3)
    with pytest.raises(ValueError, match=r"batch of 3, which is not one of its buckets \(4,\)"):
        cpu_runner.run(inputs)
    # A bucket that prepare has not compiled is refused too (rather than compiled mid-serving).
    unprepared = make_runner("compile", StepFunction(model), device=CPU, buckets=(1, 3))
    with pytest.raises(RuntimeError, match="bucket 3 is not prepared"):
        unprepared.run(inputs)


def test_half_precision_on_cpu_is_unavailable(model: GR2Policy) -> None:
    for precision in ("bf16", "fp16"):
        with pytest.raises(RunnerUnavailableError, match=f"runs {precision} only on a GPU"):
            make_runner("compile", StepFunction(model), device=CPU, precision=precision)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_parity(model: GR2Policy) -> None:
    cuda = torch.device("cuda")
    problem = toolchain_problem(cuda)
    if problem is not None:
        pytest.skip(f"torch.compile cannot build for CUDA here: {problem}")
    gpu_model = copy.deepcopy(model).to(cuda)
    runner = make_runner("compile", StepFunction(gpu_model), device=cuda, buckets=(1, 4))
    runner.prepare(example_inputs(gpu_model, cuda))
    assert isinstance(runner, CompiledRunner)
    assert set(runner.compile_s) == {1, 4}
    assert runner.cudagraph_skipped == []
    tokens, states = episode_inputs(model, 30, 3)
    ref = reference_actions(model, tokens, states, FIRST_STEPS)
    got = runner_actions(gpu_model, runner, tokens, states, FIRST_STEPS, device=cuda)
    assert cosine(ref, got) >= 0.999
    # TF32 matmuls may be on by default on the GPU; actions are within a millimetre.
    assert np.abs(ref.flat() - got.flat()).max() < 1e-3
