"""Runners: interchangeable executors of ``StepFunction`` (eager, torch.compile, ONNX Runtime,
TensorRT), chosen by ``GR2_RUNNER``; ``make_runner`` builds one."""

from gr2_policy.engine.runners.base import (
    RUNNER_NAMES,
    RunnerUnavailableError,
    StepInputs,
    StepOutputs,
    StepRunner,
    bucket_for,
    make_runner,
)

__all__ = [
    "RUNNER_NAMES",
    "RunnerUnavailableError",
    "StepInputs",
    "StepOutputs",
    "StepRunner",
    "bucket_for",
    "make_runner",
]
