"""torch.compile: one static-shape graph per batch bucket, CUDA graphs on GPU.

``prepare`` compiles the step function once per bucket (``dynamic=False``, ``fullgraph=True``)
and warms it; ``run`` then only replays. Three things keep that promise:

- Dynamo keeps one cache entry per (code object, guard set); every bucket is one entry of
  the same code object, so ``prepare`` lifts ``recompile_limit`` to cover all buckets and
  makes hitting it an error (by default it silently falls back to eager).
- ``run`` executes under ``set_stance("fail_on_recompile")``: an input that misses every
  compiled graph (a batch that is not a bucket, another dtype or layout) raises instead of
  stalling serving for a recompile. The guards check strides and whether a tensor is an
  inference tensor, so ``run`` hands the graph contiguous inference tensors, as ``prepare``
  did: inputs built under ``torch.inference_mode()`` (as the engine does) pass as they are,
  others are copied (with a warning, once).
- On CUDA, ``mode="reduce-overhead"`` captures each bucket in a CUDA graph (cudagraph trees).
  A replay writes its outputs into the graph's static buffers, which the next replay
  overwrites, so ``run`` returns clones.

Half precision runs through autocast inside the compiled function (fp32 weights kept, the
same numerics as the eager runner); it needs a GPU. Inductor needs a C++ compiler on CPU and
Triton on CUDA; their absence is reported when the runner is built, not mid-serving.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters
from torch._inductor.exc import InductorError

from gr2_policy.engine.runners.base import (
    RunnerUnavailableError,
    StepInputs,
    StepOutputs,
    autocast_dtype,
)
from gr2_policy.logs import get_logger
from gr2_policy.model.step_function import StepFunction

log = get_logger(__name__)

# Warm-up calls per bucket: with cudagraph trees the 1st call runs eagerly (warm-up), the 2nd
# records the graph, the 3rd replays it. On CPU the 1st compiles and the rest are cheap.
WARMUP_CALLS = 3


def toolchain_problem(device: torch.device) -> str | None:
    """What inductor lacks to compile for ``device`` on this machine, or None if nothing."""
    if device.type not in ("cpu", "cuda"):
        return f"torch.compile runner supports cpu and cuda devices, not {device.type!r}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available to torch (no GPU or a CPU-only torch build)"
        from torch.utils._triton import has_triton

        if not has_triton():
            return (
                "Triton is not installed or finds no usable GPU (inductor's CUDA kernels need it)"
            )
        # Triton builds its launcher stubs with the host C compiler.
        if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
            return "no C compiler (cc, gcc or clang) on PATH; Triton needs one to build kernels"
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as err:
        return f"inductor needs a C++ compiler for CPU kernels: {err} (install g++ or set CXX)"
    return None


def repeat_batch(example: StepInputs, batch: int) -> StepInputs:
    """``example`` (batch 1) repeated to ``batch`` along each tensor's batch axis
    (dim 1 for past_k / past_v / rope, dim 0 otherwise); contiguous."""

    def rep(x: Tensor, dim: int) -> Tensor:
        reps = [1] * x.dim()
        reps[dim] = batch
        return x.repeat(*reps).contiguous()

    return StepInputs(
        past_k=rep(example.past_k, 1),
        past_v=rep(example.past_v, 1),
        mask=rep(example.mask, 0),
        rope=rep(example.rope, 1),
        lang=rep(example.lang, 0),
        image_tokens=rep(example.image_tokens, 0),
        state=rep(example.state, 0),
    )


class CompiledRunner:
    """``StepFunction`` under torch.compile with static shapes, one graph per batch bucket
    (CUDA graphs on GPU). ``run`` accepts exactly the bucket sizes; the engine pads."""

    name = "compile"

    def __init__(
        self,
        step_fn: StepFunction,
        *,
        device: torch.device,
        precision: str,
        buckets: Sequence[int],
    ) -> None:
        dtype = autocast_dtype(precision)
        if device.type == "cpu" and dtype is not None:
            raise RunnerUnavailableError(
                f"the compile runner runs {precision} only on a GPU; use fp32 on CPU"
            )
        problem = toolchain_problem(device)
        if problem is not None:
            raise RunnerUnavailableError(f"cannot use the compile runner: {problem}")
        if not buckets or any(int(b) < 1 for b in buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {tuple(buckets)}")
        self.step_fn = step_fn
        self.device = device
        self.precision = precision
        self.dtype = dtype
        self._buckets = tuple(sorted({int(b) for b in buckets}))
        self.buckets: tuple[int, ...] | None = self._buckets
        self.cuda_graphs = device.type == "cuda"
        self.compile_s: dict[int, float] = {}  # bucket -> seconds of its first call
        self.cudagraph_skipped: list[int] = []  # buckets inductor ran without a CUDA graph
        self._warned_copy = False
        self._compiled = torch.compile(
            _step_callable(step_fn, device.type, dtype),
            dynamic=False,
            fullgraph=True,
            mode="reduce-overhead" if self.cuda_graphs else None,
        )

    def prepare(self, example: StepInputs) -> None:
        """Compile and warm every bucket from ``example`` (batch 1, with the dtypes ``run``
        will get). Raises RunnerUnavailableError if inductor fails to build (e.g. a broken
        toolchain). A few tens of seconds per bucket on CPU when inductor's cache is cold."""
        if example.batch != 1:
            raise ValueError(f"prepare takes a batch-1 example, got batch {example.batch}")
        buckets = self._buckets
        log.info(
            "compile runner compiling",
            buckets=list(buckets),
            device=str(self.device),
            precision=self.precision,
            cuda_graphs=self.cuda_graphs,
        )
        # The limit counts the entries of this runner's step function (dynamo counts per
        # ID-matched objects); hitting it must fail rather than fall back to eager.
        limit = max(torch._dynamo.config.recompile_limit, len(buckets))
        with (
            torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True),
            torch.inference_mode(),
        ):
            for i, bucket in enumerate(buckets, 1):
                inputs = repeat_batch(example, bucket)
                skips = counters["inductor"]["cudagraph_skips"]
                start = time.perf_counter()
                try:
                    self._call(inputs)
                    first = time.perf_counter() - start
                    for _ in range(WARMUP_CALLS - 1):
                        self._call(inputs)
                except (BackendCompilerFailed, InductorError) as err:
                    # The toolchain failed (compiler errors, missing headers); other
                    # exceptions are bugs and propagate as they are.
                    raise RunnerUnavailableError(
                        f"torch.compile failed for batch bucket {bucket}: {err}"
                    ) from err
                self.compile_s[bucket] = first
                if self.cuda_graphs and counters["inductor"]["cudagraph_skips"] > skips:
                    # Still correct, only slower; inductor logs the reason (TORCH_LOGS=cudagraphs).
                    self.cudagraph_skipped.append(bucket)
                    log.warning("compile runner bucket runs without a CUDA graph", bucket=bucket)
                log.info(
                    "compile runner bucket ready",
                    bucket=bucket,
                    index=f"{i}/{len(buckets)}",
                    compile_s=round(first, 2),
                    warm_s=round(time.perf_counter() - start - first, 3),
                )

    def run(self, inputs: StepInputs) -> StepOutputs:
        """One padded batch; its size must be one of ``buckets`` and prepared."""
        batch = inputs.batch
        if batch not in self.compile_s:
            if batch not in self._buckets:
                raise ValueError(
                    f"compile runner got a batch of {batch}, which is not one of its buckets "
                    f"{self._buckets}; pad it to bucket_for(n, runner.buckets) first"
                )
            raise RuntimeError(f"compile runner bucket {batch} is not prepared; call prepare()")
        with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
            return self._call(inputs)

    def _call(self, inputs: StepInputs) -> StepOutputs:
        args = inputs.as_tuple()
        if not all(x.is_inference() and x.is_contiguous() for x in args):
            if not self._warned_copy:
                self._warned_copy = True
                log.warning(
                    "compile runner copies its inputs: build them under torch.inference_mode()"
                    " and contiguous to avoid the copy",
                    batch=inputs.batch,
                )
            args = tuple(
                x
                if x.is_inference() and x.is_contiguous()
                else x.clone(memory_format=torch.contiguous_format)
                for x in args
            )
        if self.cuda_graphs:
            # Each call starts a new cudagraph-trees generation: the previous outputs were
            # cloned, so their static buffers may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
            raw, new_k, new_v = self._compiled(*args)
            return StepOutputs(raw=raw.clone(), new_k=new_k.clone(), new_v=new_v.clone())
        raw, new_k, new_v = self._compiled(*args)
        return StepOutputs(raw=raw, new_k=new_k, new_v=new_v)


def _step_callable(
    step_fn: StepFunction, device_type: str, dtype: torch.dtype | None
) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The function torch.compile traces: the step under autocast, raw actions in fp32."""

    def step(*args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if dtype is None:
            raw, new_k, new_v = step_fn(*args)
        else:
            with torch.autocast(device_type, dtype=dtype):
                raw, new_k, new_v = step_fn(*args)
        return raw.float(), new_k, new_v

    return step
