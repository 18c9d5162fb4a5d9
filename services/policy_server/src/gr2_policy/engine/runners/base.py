"""The runner interface: what the engine hands a runner, what it gets back, and the factory.

A runner executes ``gr2_policy.model.step_function.StepFunction`` for one batch. The engine
owns the KV pool and the scheduling; it gathers the batch's cache rows into ``StepInputs``,
pads the batch up to the runner's bucket (runners with static shapes: torch.compile / CUDA
graphs, TensorRT profiles), and writes ``StepOutputs.new_k/new_v`` back into the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from gr2_policy.errors import GR2Error
from gr2_policy.model.step_function import StepFunction

RUNNER_NAMES = ("eager", "compile", "onnx", "tensorrt")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)


class RunnerUnavailableError(GR2Error):
    """The runner cannot run here (missing package, no GPU, no compiler); the message says
    what is missing."""


@dataclass
class StepInputs:
    """One batch of B steps, on the runner's device (shapes as in ``StepFunction.forward``).

    past_k / past_v (L, B, H, S, Dh) compute dtype; mask (B, 1, P+1, S+P+1) bool; rope
    (2, B, P+1, Dh/2) float32; lang (B, d); image_tokens (B, V*N) long; state (B, 8) float32.
    """

    past_k: Tensor
    past_v: Tensor
    mask: Tensor
    rope: Tensor
    lang: Tensor
    image_tokens: Tensor
    state: Tensor

    @property
    def batch(self) -> int:
        return int(self.state.shape[0])

    def as_tuple(self) -> tuple[Tensor, ...]:
        return (
            self.past_k,
            self.past_v,
            self.mask,
            self.rope,
            self.lang,
            self.image_tokens,
            self.state,
        )


@dataclass
class StepOutputs:
    """raw (B, k, 10) float32 head outputs; new_k / new_v (L, B, H, P, Dh)."""

    raw: Tensor
    new_k: Tensor
    new_v: Tensor


class StepRunner(Protocol):
    """Executes the step function. ``buckets`` is None when any batch size runs as is,
    else the batch sizes it was prepared for (the engine pads up to the next one)."""

    name: str
    buckets: tuple[int, ...] | None

    def prepare(self, example: StepInputs) -> None:
        """Build/compile/warm up for every bucket, using ``example`` (batch 1) for shapes.
        Called once before serving; may take long (engine builds)."""
        ...

    def run(self, inputs: StepInputs) -> StepOutputs: ...


def bucket_for(n: int, buckets: Sequence[int] | None) -> int:
    """The smallest bucket that holds n steps (n itself when there are no buckets)."""
    if buckets is None:
        return n
    for size in sorted(buckets):
        if size >= n:
            return size
    raise ValueError(f"batch of {n} exceeds the largest bucket {max(buckets)}")


def make_runner(
    name: str,
    step_fn: StepFunction,
    *,
    device: torch.device,
    precision: str = "fp32",
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    cache_dir: Path | None = None,
    model_hash: str = "",
) -> StepRunner:
    """The runner called ``name`` (one of RUNNER_NAMES) over ``step_fn``.

    precision: fp32, bf16 or fp16 (half precision needs a GPU for every runner but eager);
    buckets: batch sizes the static-shape runners prepare; cache_dir: where exported ONNX
    files and TensorRT engines are kept (keyed by ``model_hash``).
    Raises RunnerUnavailableError when the runner cannot run on this machine.
    """
    if name == "eager":
        from gr2_policy.engine.runners.eager import EagerRunner

        return EagerRunner(step_fn, device=device, precision=precision)
    if name == "compile":
        from gr2_policy.engine.runners.compiled import CompiledRunner

        return CompiledRunner(step_fn, device=device, precision=precision, buckets=buckets)
    if name == "onnx":
        from gr2_policy.engine.runners.onnx_runtime import OnnxRunner

        return OnnxRunner(
            step_fn, device=device, precision=precision, cache_dir=cache_dir, model_hash=model_hash
        )
    if name == "tensorrt":
        from gr2_policy.engine.runners.tensorrt import TensorRTRunner

        return TensorRTRunner(
            step_fn,
            device=device,
            precision=precision,
            buckets=buckets,
            cache_dir=cache_dir,
            model_hash=model_hash,
        )
    raise ValueError(f"unknown runner {name!r}; one of {', '.join(RUNNER_NAMES)}")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32)."""
    try:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}") from None
