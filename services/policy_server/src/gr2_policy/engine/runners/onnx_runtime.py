"""ONNX Runtime: ``StepFunction`` exported to ONNX with the KV cache as explicit inputs/outputs.

Export uses torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``: torch.export +
onnxscript, opset 20), which takes ``StepFunction`` as it is, with one symbolic ``batch`` axis
shared by every input and output (axis 1 of past_k/past_v/rope/new_k/new_v, axis 0 of the
rest). The TorchScript exporter is not needed. The example is widened to batch 2 before export
so that no size-1 batch gets baked into the graph.

The exported file is cached at ``cache_dir / f"step-{model_hash}-{precision}.onnx"`` and
written atomically; the TensorRT runner builds its engines from the same fp32 file.

Running: CPUExecutionProvider (fp32 only) gets numpy views of the torch tensors and its
outputs are wrapped with ``torch.from_numpy`` (no copies). On CUDA, CUDAExecutionProvider
(needs ``onnxruntime-gpu``) reads and writes torch CUDA tensors through IO binding; fp16/bf16
run a copy of the step function cast to that dtype (past_k/past_v/lang/new_k/new_v in it, raw
actions in float32).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from gr2_policy.engine.runners.base import (
    RunnerUnavailableError,
    StepInputs,
    StepOutputs,
    autocast_dtype,
)
from gr2_policy.model.step_function import StepFunction

ONNX_INPUTS = ("past_k", "past_v", "mask", "rope", "lang", "image_tokens", "state")
ONNX_OUTPUTS = ("raw", "new_k", "new_v")
BATCH_AXIS = {
    "past_k": 1,
    "past_v": 1,
    "mask": 0,
    "rope": 1,
    "lang": 0,
    "image_tokens": 0,
    "state": 0,
    "raw": 0,
    "new_k": 1,
    "new_v": 1,
}
ORT_INSTALL_HINT = "pip install onnxruntime (onnxruntime-gpu for CUDA)"
EXPORT_INSTALL_HINT = "pip install onnx onnxscript"

# torch dtype -> ONNX TensorProto element type, for IO binding (accepts ints since ORT 1.20).
_ONNX_ELEMENT = {
    torch.float32: 1,
    torch.bool: 9,
    torch.int64: 7,
    torch.float16: 10,
    torch.bfloat16: 16,
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gr2/engines``, else ``~/.cache/gr2/engines``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gr2" / "engines"


def onnx_path(cache_dir: Path | None, model_hash: str, precision: str) -> Path:
    """Where the exported step of model ``model_hash`` at ``precision`` is cached."""
    return (cache_dir or default_cache_dir()) / f"step-{model_hash}-{precision}.onnx"


def step_hash(step_fn: StepFunction) -> str:
    """16-hex digest of the step function's config and weights, for callers that give no
    model hash (differs from ``model_hash(policy)``: the text encoder is not part of it)."""
    digest = hashlib.sha256(json.dumps(step_fn.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(step_fn.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write; renamed onto ``path`` (after fsync) only
    when the block succeeds, removed otherwise. Readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb") as written:
            os.fsync(written.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class _CastStep(nn.Module):
    """A copy of the step function in ``dtype``: past_k/past_v/lang and new_k/new_v in it,
    mask bool, rope and state float32 in, raw actions float32 out."""

    def __init__(self, step_fn: StepFunction, dtype: torch.dtype) -> None:
        super().__init__()
        self.step_fn = copy.deepcopy(step_fn).to(dtype)
        self.dtype = dtype

    def forward(self, *args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        past_k, past_v, mask, rope, lang, image_tokens, state = args
        raw, new_k, new_v = self.step_fn(
            past_k, past_v, mask, rope, lang, image_tokens, state.to(self.dtype)
        )
        return raw.float(), new_k, new_v


def widen(example: StepInputs, batch: int) -> StepInputs:
    """``example`` repeated along each input's batch axis (``BATCH_AXIS``) to ``batch`` rows."""
    tensors = []
    for name, tensor in zip(ONNX_INPUTS, example.as_tuple(), strict=True):
        axis = BATCH_AXIS[name]
        reps = -(-batch // tensor.shape[axis])
        tensors.append(torch.cat([tensor] * reps, dim=axis).narrow(axis, 0, batch))
    return StepInputs(*tensors)


def input_dtypes(precision: str) -> dict[str, torch.dtype]:
    """The dtype of every ONNX input for a precision (fp32/bf16/fp16)."""
    compute = autocast_dtype(precision) or torch.float32
    return {
        "past_k": compute,
        "past_v": compute,
        "mask": torch.bool,
        "rope": torch.float32,
        "lang": compute,
        "image_tokens": torch.int64,
        "state": torch.float32,
    }


def export_step_onnx(
    step_fn: StepFunction, path: Path, example: StepInputs, *, precision: str = "fp32"
) -> Path:
    """Export ``step_fn`` (at ``precision``) to ``path`` with a dynamic batch axis; atomic.

    ``example`` gives the non-batch shapes (any batch; widened to 2 for the trace).
    Raises RunnerUnavailableError when onnx/onnxscript are missing.
    """
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise RunnerUnavailableError(
            f"exporting the step to ONNX needs {' and '.join(missing)} ({EXPORT_INSTALL_HINT})"
        )
    dtype = autocast_dtype(precision)
    module: nn.Module = step_fn if dtype is None else _CastStep(step_fn, dtype)
    dtypes = input_dtypes(precision)
    if example.batch < 2:
        example = widen(example, 2)
    args = [
        tensor.to(dtypes[name])
        for name, tensor in zip(ONNX_INPUTS, example.as_tuple(), strict=True)
    ]
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic_shapes = {name: {BATCH_AXIS[name]: batch} for name in ONNX_INPUTS}
    with warnings.catch_warnings():
        # one Dim shared by all inputs: the exporter notes it names the axis only once
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        program = torch.onnx.export(
            module.eval(),
            tuple(args),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=list(ONNX_INPUTS),
            output_names=list(ONNX_OUTPUTS),
            verbose=False,
        )
    if program is None:  # only the TorchScript exporter with a file argument returns None
        raise RuntimeError("torch.onnx.export returned no program")
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)  # one file (< 2 GB protobuf limit for gr2-base)
    return path


def ensure_step_onnx(
    step_fn: StepFunction,
    example: StepInputs,
    *,
    cache_dir: Path | None,
    model_hash: str,
    precision: str = "fp32",
) -> Path:
    """The cached ONNX file of this model at ``precision``, exported only when missing."""
    path = onnx_path(cache_dir, model_hash, precision)
    if not path.exists():
        export_step_onnx(step_fn, path, example, precision=precision)
    return path


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, or RunnerUnavailableError saying what to install."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise RunnerUnavailableError(
            f"ONNX runner needs the `onnxruntime` package ({ORT_INSTALL_HINT})"
        ) from exc


class OnnxRunner:
    """Runs the exported step with ONNX Runtime; any batch size (dynamic batch axis)."""

    name = "onnx"
    buckets: tuple[int, ...] | None = None

    def __init__(
        self,
        step_fn: StepFunction,
        *,
        device: torch.device,
        precision: str = "fp32",
        cache_dir: Path | None = None,
        model_hash: str = "",
    ) -> None:
        autocast_dtype(precision)  # ValueError on an unknown name
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise RunnerUnavailableError(f"ONNX runner runs on cpu or cuda, not {device.type}")
        if device.type == "cpu" and precision != "fp32":
            raise RunnerUnavailableError(
                f"ONNX runner on CPU runs fp32 only (asked for {precision}); "
                "use precision=fp32 or a CUDA device"
            )
        self._ort = import_onnxruntime()
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RunnerUnavailableError("ONNX runner on CUDA needs a CUDA GPU; none here")
            if "CUDAExecutionProvider" not in self._ort.get_available_providers():
                raise RunnerUnavailableError(
                    "ONNX runner on CUDA needs onnxruntime's CUDAExecutionProvider "
                    "(pip install onnxruntime-gpu)"
                )
            device = torch.device(
                "cuda", torch.cuda.current_device() if device.index is None else device.index
            )
        self.step_fn = step_fn
        self.device = device
        self.precision = precision
        self.cache_dir = cache_dir
        self.model_hash = model_hash or step_hash(step_fn)
        self.path = onnx_path(cache_dir, self.model_hash, precision)
        self._dtypes = input_dtypes(precision)
        self._session: Any = None
        self._output_shapes: list[list[int | str]] = []
        self._run: Callable[[StepInputs], StepOutputs] = self._not_prepared

    def prepare(self, example: StepInputs) -> None:
        """Export (when not cached), open the session, run ``example`` once."""
        ensure_step_onnx(
            self.step_fn,
            example,
            cache_dir=self.cache_dir,
            model_hash=self.model_hash,
            precision=self.precision,
        )
        ort = self._ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # idle ORT workers spinning between steps take the cores from the event loop and the
        # engine thread (on 2 cores under load: 12 -> 7 ms at batch 1 without spinning)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.device.type == "cuda":
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": self.device.index})]
            self._run = self._run_cuda
        else:
            providers = ["CPUExecutionProvider"]
            self._run = self._run_cpu
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=providers
            )
        except ort.capi.onnxruntime_pybind11_state.NotImplemented as exc:
            raise RunnerUnavailableError(
                f"ONNX Runtime has no {self.device.type} kernel for part of the step at "
                f"{self.precision}: {exc}"
            ) from exc
        self._output_shapes = [out.shape for out in self._session.get_outputs()]
        self.run(example)

    def run(self, inputs: StepInputs) -> StepOutputs:
        return self._run(inputs)

    def _not_prepared(self, inputs: StepInputs) -> StepOutputs:
        raise RuntimeError("OnnxRunner.run before prepare()")

    def _run_cpu(self, inputs: StepInputs) -> StepOutputs:
        feeds = {
            name: tensor.detach().to(self._dtypes[name]).contiguous().numpy()
            for name, tensor in zip(ONNX_INPUTS, inputs.as_tuple(), strict=True)
        }
        raw, new_k, new_v = self._session.run(ONNX_OUTPUTS, feeds)
        return StepOutputs(
            raw=torch.from_numpy(raw), new_k=torch.from_numpy(new_k), new_v=torch.from_numpy(new_v)
        )

    def _run_cuda(self, inputs: StepInputs) -> StepOutputs:
        binding = self._session.io_binding()
        device_id = self.device.index
        keep = []  # the bound tensors must outlive the run
        for name, tensor in zip(ONNX_INPUTS, inputs.as_tuple(), strict=True):
            tensor = tensor.detach().to(self.device, self._dtypes[name]).contiguous()
            keep.append(tensor)
            binding.bind_input(
                name,
                "cuda",
                device_id,
                _ONNX_ELEMENT[tensor.dtype],
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        batch = inputs.batch
        compute = self._dtypes["past_k"]
        outputs = {}
        for name, shape in zip(ONNX_OUTPUTS, self._output_shapes, strict=True):
            dims = [batch if isinstance(d, str) else int(d) for d in shape]
            dtype = torch.float32 if name == "raw" else compute
            out = torch.empty(dims, dtype=dtype, device=self.device)
            outputs[name] = out
            binding.bind_output(
                name, "cuda", device_id, _ONNX_ELEMENT[dtype], tuple(dims), out.data_ptr()
            )
        # ORT runs on its own stream: the inputs must be ready before it starts; the run
        # itself returns only after ORT's stream is done.
        torch.cuda.current_stream(self.device).synchronize()
        self._session.run_with_iobinding(binding)
        return StepOutputs(raw=outputs["raw"], new_k=outputs["new_k"], new_v=outputs["new_v"])
