"""TensorRT: an engine built from the step's fp32 ONNX export, one profile per batch bucket.

Each bucket b gets an optimisation profile with min = opt = max = b on the batch axis of every
input (axis 1 of past_k/past_v/rope, axis 0 of the rest), so each profile is a static-shape
engine. fp16/bf16 are TensorRT builder flags on the fp32 network (I/O stays fp32; inputs in
another dtype are cast on the way in). The serialized engine is cached at
``engine_cache_path(...)``, keyed by model hash, GPU compute capability, TensorRT version,
precision and buckets, and written atomically; a cached plan is loaded instead of rebuilt.

Everything before the TensorRT calls is pure and tested without a GPU: ``engine_cache_path``,
``profile_shapes``, ``profile_index``, ``availability_problem``. The engine pads each batch to
a bucket before ``run``; ``run`` refuses any other batch size. Outputs live in per-bucket
buffers and are valid until the next ``run`` of that bucket.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from gr2_policy.engine.runners.base import (
    DEFAULT_BUCKETS,
    RunnerUnavailableError,
    StepInputs,
    StepOutputs,
    autocast_dtype,
)
from gr2_policy.engine.runners.onnx_runtime import (
    BATCH_AXIS,
    ONNX_INPUTS,
    ONNX_OUTPUTS,
    atomic_path,
    default_cache_dir,
    ensure_step_onnx,
    step_hash,
    widen,
)
from gr2_policy.model.step_function import StepFunction

TRT_REQUIREMENT = (
    "TensorRT runner needs a CUDA GPU and the `tensorrt` package "
    "(pip install tensorrt-cu13, matching the CUDA 13 build of torch 2.13)"
)


def availability_problem(
    device: torch.device, *, cuda_available: bool, tensorrt_found: bool
) -> str | None:
    """Why the TensorRT runner cannot run on ``device`` here (None when it can)."""
    missing = []
    if device.type != "cuda":
        missing.append(f"the device is {device.type}, not cuda")
    elif not cuda_available:
        missing.append("no CUDA GPU is available")
    if not tensorrt_found:
        missing.append("the `tensorrt` package is not installed")
    if not missing:
        return None
    return f"{TRT_REQUIREMENT}: {'; '.join(missing)}"


def import_tensorrt(device: torch.device) -> ModuleType:
    """The ``tensorrt`` module, or RunnerUnavailableError saying what is missing."""
    problem = availability_problem(
        device,
        cuda_available=torch.cuda.is_available(),
        tensorrt_found=importlib.util.find_spec("tensorrt") is not None,
    )
    if problem is not None:
        raise RunnerUnavailableError(problem)
    return importlib.import_module("tensorrt")


def normalize_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted, unique, positive batch sizes."""
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise ValueError(f"buckets must be positive batch sizes, got {tuple(buckets)}")
    return out


def engine_cache_path(
    cache_dir: Path | None,
    *,
    model_hash: str,
    compute_capability: tuple[int, int],
    trt_version: str,
    precision: str,
    buckets: Sequence[int],
) -> Path:
    """Where the serialized engine for this (model, GPU arch, TensorRT, precision, buckets)
    is cached."""
    major, minor = compute_capability
    sizes = "-".join(str(b) for b in normalize_buckets(buckets))
    name = f"step-{model_hash}-sm{major}{minor}-trt{trt_version}-{precision}-b{sizes}.plan"
    return (cache_dir or default_cache_dir()) / name


def profile_shapes(
    input_shapes: Mapping[str, Sequence[int]], buckets: Sequence[int]
) -> list[dict[str, tuple[int, ...]]]:
    """Per profile (in ``normalize_buckets`` order) the shape of every input at that bucket.

    input_shapes: the shape of each ONNX input at any batch (e.g. the batch-1 example); the
    batch axis (``BATCH_AXIS``) is replaced by the bucket.
    """
    profiles = []
    for bucket in normalize_buckets(buckets):
        shapes = {}
        for name in ONNX_INPUTS:
            shape = list(input_shapes[name])
            shape[BATCH_AXIS[name]] = bucket
            shapes[name] = tuple(shape)
        profiles.append(shapes)
    return profiles


def profile_index(batch: int, buckets: Sequence[int]) -> int:
    """The profile that runs ``batch`` (ValueError unless it is exactly a bucket)."""
    sizes = normalize_buckets(buckets)
    if batch not in sizes:
        raise ValueError(f"batch {batch} is not a bucket {sizes}; pad it to one first")
    return sizes.index(batch)


class TensorRTRunner:
    """Runs a TensorRT engine with one static-shape profile per batch bucket (CUDA only)."""

    name = "tensorrt"

    def __init__(
        self,
        step_fn: StepFunction,
        *,
        device: torch.device,
        precision: str = "fp32",
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        cache_dir: Path | None = None,
        model_hash: str = "",
    ) -> None:
        autocast_dtype(precision)  # ValueError on an unknown name
        device = torch.device(device)
        self._trt = import_tensorrt(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.step_fn = step_fn
        self.device = device
        self.precision = precision
        self.buckets: tuple[int, ...] | None = normalize_buckets(buckets)
        self.cache_dir = cache_dir
        self.model_hash = model_hash or step_hash(step_fn)
        self.path = engine_cache_path(
            cache_dir,
            model_hash=self.model_hash,
            compute_capability=torch.cuda.get_device_capability(device),
            trt_version=self._trt.__version__,
            precision=precision,
            buckets=self.buckets,
        )
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._active_profile = -1
        self._input_dtypes: dict[str, torch.dtype] = {}
        self._outputs: dict[int, dict[str, Tensor]] = {}

    def prepare(self, example: StepInputs) -> None:
        """Load the cached engine or build it (from the cached/exported fp32 ONNX), allocate
        every bucket's outputs, run each bucket once."""
        trt = self._trt
        logger = trt.Logger(trt.Logger.WARNING)
        if not self.path.exists():
            self._build(example, logger)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(logger)  # kept alive as long as the engine
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise RuntimeError(f"TensorRT could not load {self.path}; delete it to rebuild")
            self._context = self._engine.create_execution_context()
        self._input_dtypes = {
            name: _torch_dtype(trt, self._engine.get_tensor_dtype(name)) for name in ONNX_INPUTS
        }
        shapes = {
            name: tuple(t.shape) for name, t in zip(ONNX_INPUTS, example.as_tuple(), strict=True)
        }
        assert self.buckets is not None
        for bucket, profile in zip(self.buckets, profile_shapes(shapes, self.buckets), strict=True):
            self._select_profile(profile_index(bucket, self.buckets))
            for name, shape in profile.items():
                self._context.set_input_shape(name, shape)
            self._outputs[bucket] = {
                name: torch.empty(
                    tuple(self._context.get_tensor_shape(name)),
                    dtype=_torch_dtype(trt, self._engine.get_tensor_dtype(name)),
                    device=self.device,
                )
                for name in ONNX_OUTPUTS
            }
            self.run(widen(example, bucket))
        torch.cuda.current_stream(self.device).synchronize()

    def run(self, inputs: StepInputs) -> StepOutputs:
        """One step of a batch that is exactly a bucket (the engine pads)."""
        assert self.buckets is not None
        index = profile_index(inputs.batch, self.buckets)
        context = self._context
        if context is None:
            raise RuntimeError("TensorRTRunner.run before prepare()")
        self._select_profile(index)
        bound = []  # the cast inputs must outlive the enqueue
        for name, tensor in zip(ONNX_INPUTS, inputs.as_tuple(), strict=True):
            tensor = tensor.to(self.device, self._input_dtypes[name]).contiguous()
            bound.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = self._outputs[inputs.batch]
        for name, out in outputs.items():
            context.set_tensor_address(name, out.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return StepOutputs(raw=outputs["raw"], new_k=outputs["new_k"], new_v=outputs["new_v"])

    def _select_profile(self, index: int) -> None:
        if index != self._active_profile:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            self._context.set_optimization_profile_async(index, stream)
            self._active_profile = index

    def _build(self, example: StepInputs, logger: Any) -> None:
        trt = self._trt
        onnx_file = ensure_step_onnx(
            self.step_fn, example, cache_dir=self.cache_dir, model_hash=self.model_hash
        )
        builder = trt.Builder(logger)
        # explicit batch is the only mode (and the flag deprecated) from TensorRT 10 on
        explicit = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(0 if _major(trt.__version__) >= 10 else explicit)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors}")
        config = builder.create_builder_config()
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        shapes = {
            name: tuple(t.shape) for name, t in zip(ONNX_INPUTS, example.as_tuple(), strict=True)
        }
        assert self.buckets is not None
        for profile_shape in profile_shapes(shapes, self.buckets):
            profile = builder.create_optimization_profile()
            for name, shape in profile_shape.items():
                profile.set_shape(name, shape, shape, shape)
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError("TensorRT failed to build the step engine (see its log above)")
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(bytes(plan))


def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.bool: torch.bool,
    }
    return table[dtype]


def _major(version: str) -> int:
    return int(version.split(".")[0])
