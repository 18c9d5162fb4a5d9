"""Eager PyTorch: the reference every other runner is checked against (CPU or CUDA)."""

from __future__ import annotations

import contextlib

import torch

from gr2_policy.engine.runners.base import StepInputs, StepOutputs, autocast_dtype
from gr2_policy.model.step_function import StepFunction


class EagerRunner:
    """Runs the step function as is; bf16/fp16 through autocast (fp32 weights kept)."""

    name = "eager"
    buckets: tuple[int, ...] | None = None

    def __init__(self, step_fn: StepFunction, *, device: torch.device, precision: str) -> None:
        self.step_fn = step_fn
        self.device = device
        self.dtype = autocast_dtype(precision)

    def prepare(self, example: StepInputs) -> None:
        self.run(example)  # first-call allocations and kernel choice

    def run(self, inputs: StepInputs) -> StepOutputs:
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            raw, new_k, new_v = self.step_fn(*inputs.as_tuple())
        return StepOutputs(raw=raw.float(), new_k=new_k, new_v=new_v)
