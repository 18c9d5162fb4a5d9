"""The batched engine's step: KV-pool sizing, runners, batching gain, tokenizer and FLOPs.

One run measures, for one preset on one device (random weights; speed does not depend on
their values):

- ``kv_cache``: pure arithmetic from the presets' configs (no model): KV bytes of one
  episode per cache dtype (fp32, bf16, fp8) and how many episodes an 80 GB GPU holds when
  the pool may use 90 % of it (``slots_for_budget``), with h, P, L and d of each preset.
- ``runners``: ``StepFunction`` through each runner's ``run`` (eager, torch.compile, ONNX
  Runtime, TensorRT) at each batch size: median and p90 step time, time per episode,
  episode-steps per second, the batching gain (time per episode at batch 1 / at batch B)
  and the speed against eager. Inputs are built as the engine builds them: a
  ``KVCachePool`` gather plus ``step_layout`` at a step > h, the pool first filled by h
  real eager steps so the window is full. Runners are timed in interleaved rounds (each
  round runs every runner back to back) so slow drift of the machine's load hits them
  alike. A runner that cannot run here reports why instead of figures. Parity: max |diff|
  of each runner's raw outputs and new keys against eager, on the largest batch.
- ``pool_io``: the engine's per-batch work around the runner: gather + ``step_layout``, and
  writing the new keys/values back.
- ``tokenizer``: ``GR2Policy.tokenize_images`` (the VQGAN encoder, every view of every
  episode) at the same batch sizes, per episode, and its batching gain.
- ``flops``: an estimate of one step of one episode (the GPT blocks' linears, attention over
  the cache, input embeddings, the action head's decoder), the bytes it must read, and the
  achieved GFLOP/s of every runner and batch next to a large matmul's GFLOP/s on the same
  device: a step far below the matmul figure is bound by memory or overhead, not compute.

Prints one JSON object on stdout (progress on stderr); ``--out FILE`` also writes it.

    python bench/engine.py --out bench/results/engine_cpu_2core.json
    python bench/engine.py --device cuda --preset gr2-base --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gr2_policy.engine.kv_pool import (
    CACHE_DTYPES,
    KVCachePool,
    bytes_per_episode,
    slots_for_budget,
)
from gr2_policy.engine.runners import (
    RunnerUnavailableError,
    StepInputs,
    StepOutputs,
    StepRunner,
    make_runner,
)
from gr2_policy.engine.runners.base import autocast_dtype
from gr2_policy.logs import configure_logging
from gr2_policy.model import GR2Config, GR2Policy, init_random_policy, model_hash
from gr2_policy.model.step_function import StepFunction, step_layout
from torch import Tensor, nn
from torch._dynamo.utils import counters

PRESETS = ("gr2-tiny", "gr2-small", "gr2-base")
KV_DTYPES = ("fp32", "bf16", "fp8")
ROUNDS = 3  # interleaved rounds per batch size; repeats are split among them
INSTRUCTION = "pick up the red block and put it in the bowl"


def log(message: str) -> None:
    print(f"[bench engine] {message}", file=sys.stderr, flush=True)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def stats(seconds: list[float]) -> dict[str, float]:
    arr = np.asarray(seconds)
    return {
        "median_ms": ms(float(np.median(arr))),
        "p90_ms": ms(float(np.percentile(arr, 90))),
    }


# -- 1. KV-cache sizing (arithmetic only) -----------------------------------------------


def kv_cache_table(gpu_bytes: float, fraction: float) -> dict[str, Any]:
    budget = int(fraction * gpu_bytes)
    presets = []
    for name in PRESETS:
        cfg = GR2Config.from_preset(name)
        per_dtype: dict[str, Any] = {}
        fp32_slots = slots_for_budget(cfg, budget, CACHE_DTYPES["fp32"])
        for dtype_name in KV_DTYPES:
            dtype = CACHE_DTYPES[dtype_name]
            per_episode = bytes_per_episode(cfg, dtype)
            slots = slots_for_budget(cfg, budget, dtype)
            per_dtype[dtype_name] = {
                "bytes_per_episode": per_episode,
                "mib_per_episode": round(per_episode / 2**20, 3),
                "episodes_in_budget": slots,
                "episodes_vs_fp32": round(slots / fp32_slots, 3) if fp32_slots else None,
            }
        presets.append(
            {
                "preset": name,
                "history_h": cfg.history,
                "tokens_per_step_P": cfg.tokens_per_step,
                "n_layers_L": cfg.n_layers,
                "d_model": cfg.d_model,
                "dtypes": per_dtype,
            }
        )
    return {
        "gpu_bytes": int(gpu_bytes),
        "pool_fraction": fraction,
        "budget_bytes": budget,
        "note": "bytes = 2 (k, v) x L x h*P x d x element + 2 x 8 bytes of bookkeeping per "
        "key slot; episodes = budget // bytes - 1 (the pool's scratch row)",
        "presets": presets,
    }


# -- 4. FLOPs (estimate) ------------------------------------------------------------------


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def step_flops(model: GR2Policy, compute_dtype: torch.dtype) -> dict[str, Any]:
    """FLOPs and bytes of one step of one episode (multiply-add = 2 FLOPs; weights only,
    biases, norms, softmax and RoPE left out)."""
    cfg = model.config
    p, h, d, layers = cfg.tokens_per_step, cfg.history, cfg.d_model, cfg.n_layers
    queries, keys = p + 1, h * p + p + 1
    k = cfg.action_horizon
    gpt, head = model.gpt, model.action_head
    gpt_linear = 2 * queries * linear_weights(gpt.blocks)
    attention = layers * 2 * 2 * queries * keys * d
    embeddings = 2 * (
        cfg.image_tokens_per_step * gpt.image_in.weight.numel() + gpt.state_proj.weight.numel()
    )
    head_tokens = k + 2  # [z, ACT, k queries]
    action_head = (
        2 * head_tokens * linear_weights(head.decoder)
        + 2 * (head.z_in.weight.numel() + head.act_in.weight.numel())
        + 2 * k * head.out.weight.numel()
        + cfg.action_head_layers * 2 * 2 * head_tokens**2 * cfg.action_head_dim
    )
    total = gpt_linear + attention + embeddings + action_head
    element = torch.empty((), dtype=compute_dtype).element_size()
    weights = (
        linear_weights(gpt.blocks)
        + gpt.image_in.weight.numel()
        + gpt.state_proj.weight.numel()
        + linear_weights(head.decoder)
        + head.z_in.weight.numel()
        + head.act_in.weight.numel()
        + head.out.weight.numel()
    )
    past_kv = 2 * layers * h * p * d * element  # read
    new_kv = 2 * layers * p * d * element  # written
    mask = queries * keys  # bool
    return {
        "queries_per_step": queries,
        "keys_per_query": keys,
        "gflop_per_episode_step": round(total / 1e9, 5),
        "breakdown_gflop": {
            "gpt_linears": round(gpt_linear / 1e9, 5),
            "attention": round(attention / 1e9, 5),
            "embeddings": round(embeddings / 1e9, 5),
            "action_head": round(action_head / 1e9, 5),
        },
        "weight_bytes_per_batch": weights * element,
        "kv_and_mask_bytes_per_episode": past_kv + new_kv + mask,
        "note": "linears: 2 x tokens x weights; attention: 2 x 2 x queries x keys x d per "
        "layer (masked keys count: the kernels compute them); bytes: weights once per batch, "
        "past + new keys/values and the mask per episode, in the compute dtype",
        "_flop": total,
        "_weights": weights * element,
        "_per_episode_bytes": past_kv + new_kv + mask,
    }


def matmul_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> dict[str, Any]:
    """GFLOP/s of a large square matmul: what the device reaches when compute-bound."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    seconds = float(np.median([timed(lambda: torch.mm(a, b), device) for _ in range(repeats)]))
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "median_ms": ms(seconds),
        "gflops": round(2 * n**3 / seconds / 1e9, 1),
    }


# -- inputs as the engine builds them -------------------------------------------------------


class StepBench:
    """A model, a KV pool whose first ``max_batch`` rows hold a full window, and the engine's
    input construction (gather + step_layout) for a batch of those rows."""

    def __init__(
        self,
        model: GR2Policy,
        device: torch.device,
        compute_dtype: torch.dtype,
        cache_dtype: torch.dtype,
        max_batch: int,
        seed: int = 0,
    ) -> None:
        cfg = model.config
        self.model, self.cfg, self.device = model, cfg, device
        self.compute_dtype = compute_dtype
        self.step = 3 * cfg.history  # > h: the window is full
        self.pool = KVCachePool(cfg, max_batch, device=device, dtype=cache_dtype)
        gen = torch.Generator().manual_seed(seed)
        # inference tensors, as the engine's (the compile runner's guards check it)
        with torch.inference_mode():
            self.lang = model.encode_instruction([INSTRUCTION] * max_batch).to(compute_dtype)
            self.tokens = torch.randint(
                0, cfg.codebook_size, (max_batch, cfg.image_tokens_per_step), generator=gen
            ).to(device)
            state = torch.zeros(max_batch, cfg.state_dim)
            state[:, :3] = torch.rand(max_batch, 3, generator=gen) * 0.5
            state[:, 4] = 1.0  # a unit quaternion (w x y z): 180 degrees about x
            self.state = state.to(device)
        # Fill the window with h real steps (eager, fp32 compute as stored).
        step_fn = StepFunction(model)
        rows = torch.arange(max_batch, device=device)
        with torch.inference_mode():
            for s in range(self.step - cfg.history, self.step):
                steps = torch.full((max_batch,), s, device=device)
                inputs = self.inputs(max_batch, steps=steps, dtype=torch.float32)
                _, new_k, new_v = step_fn(*inputs.as_tuple())
                self.pool.write(rows, steps, new_k, new_v)

    def inputs(
        self, batch: int, *, steps: Tensor | None = None, dtype: torch.dtype | None = None
    ) -> StepInputs:
        """The engine's StepInputs for rows 0..batch-1 at ``self.step`` (inference tensors,
        contiguous, as ``BatchingEngine._execute`` builds them)."""
        dtype = dtype or self.compute_dtype
        with torch.inference_mode():
            rows = torch.arange(batch, device=self.device)
            if steps is None:
                steps = torch.full((batch,), self.step, device=self.device)
            past_k, past_v, key_step, key_pos = self.pool.gather(rows, dtype)
            mask, rope = step_layout(self.cfg, steps, key_step, key_pos)
            return StepInputs(
                past_k,
                past_v,
                mask,
                rope,
                self.lang[:batch].to(dtype).contiguous(),
                self.tokens[:batch].contiguous(),
                self.state[:batch].contiguous(),
            )


# -- 2. runners ---------------------------------------------------------------------------


def build_runners(
    names: list[str],
    model: GR2Policy,
    bench: StepBench,
    args: argparse.Namespace,
    cache_dir: Path,
) -> tuple[dict[str, StepRunner], dict[str, dict[str, Any]]]:
    """Make and prepare each runner; returns the usable ones and a report for every name."""
    step_fn = StepFunction(model)
    runners: dict[str, StepRunner] = {}
    reports: dict[str, dict[str, Any]] = {}
    digest = model_hash(model)
    for name in names:
        log(f"preparing runner {name} (buckets {args.batches}) ...")
        cache_before = dict(counters["inductor"])
        start = time.perf_counter()
        try:
            runner = make_runner(
                name,
                step_fn,
                device=bench.device,
                precision=args.precision,
                buckets=args.batches,
                cache_dir=cache_dir,
                model_hash=digest,
            )
            runner.prepare(bench.inputs(1))
        except RunnerUnavailableError as err:
            log(f"runner {name} unavailable: {err}")
            reports[name] = {"available": False, "reason": str(err)}
            continue
        prepare_s = time.perf_counter() - start
        report: dict[str, Any] = {"available": True, "prepare_s": round(prepare_s, 2)}
        compile_s = getattr(runner, "compile_s", None)
        if compile_s:
            report["compile_s_per_bucket"] = {str(b): round(s, 2) for b, s in compile_s.items()}
            # inductor's on-disk cache: a warm one (the same model compiled before on this
            # machine) turns tens of seconds per bucket into a few
            report["inductor_fx_graph_cache"] = {
                kind: counters["inductor"][f"fxgraph_cache_{kind}"]
                - cache_before.get(f"fxgraph_cache_{kind}", 0)
                for kind in ("hit", "miss")
            }
        log(f"runner {name} ready in {prepare_s:.1f} s")
        runners[name] = runner
        reports[name] = report
    return runners, reports


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float().to(a.device)).abs().max())


def parity(
    runners: dict[str, StepRunner], reference: StepOutputs, inputs: StepInputs
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, runner in runners.items():
        got = runner.run(inputs)
        raw, ref = got.raw.float().flatten(), reference.raw.float().flatten().to(got.raw.device)
        out[name] = {
            "raw_max_abs_diff": max_abs_diff(got.raw, reference.raw),
            "raw_cosine": round(float(torch.nn.functional.cosine_similarity(raw, ref, dim=0)), 7),
            "new_k_max_abs_diff": max_abs_diff(got.new_k, reference.new_k),
            "new_v_max_abs_diff": max_abs_diff(got.new_v, reference.new_v),
        }
    return out


def time_runners(
    runners: dict[str, StepRunner],
    bench: StepBench,
    batches: list[int],
    flops: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per runner, per batch: step-time figures, timed in interleaved rounds."""
    device = bench.device
    samples: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in runners}
    per_round = max(1, -(-args.repeats // ROUNDS))
    for batch in batches:
        inputs = bench.inputs(batch)
        log(f"timing batch {batch}: {', '.join(runners)} ...")
        for _ in range(ROUNDS):
            for name, runner in runners.items():
                for _ in range(args.warmup):
                    runner.run(inputs)
                samples[name][batch] += [
                    timed(lambda runner=runner, x=inputs: runner.run(x), device)
                    for _ in range(per_round)
                ]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in runners:
        per_batch: dict[str, dict[str, float]] = {}
        first = float(np.median(samples[name][batches[0]])) / batches[0]
        for batch in batches:
            median = float(np.median(samples[name][batch]))
            row = stats(samples[name][batch])
            row["per_episode_ms"] = ms(median / batch)
            row["episode_steps_per_s"] = round(batch / median, 1)
            row["batching_gain"] = round(first / (median / batch), 2)
            row["gflops"] = round(batch * flops["_flop"] / median / 1e9, 2)
            if "eager" in samples:
                row["speedup_vs_eager"] = round(
                    float(np.median(samples["eager"][batch])) / median, 2
                )
            per_batch[str(batch)] = row
        results[name] = per_batch
    return results


def time_pool_io(bench: StepBench, batches: list[int], repeats: int) -> dict[str, Any]:
    """Gather + step_layout, and the write of new keys/values, per batch."""
    device = bench.device
    out: dict[str, Any] = {}
    cfg = bench.cfg
    head_dim = cfg.d_model // cfg.n_heads
    for batch in batches:
        rows = torch.arange(batch, device=device)
        steps = torch.full((batch,), bench.step, device=device)
        shape = (cfg.n_layers, batch, cfg.n_heads, cfg.tokens_per_step, head_dim)
        new_k = torch.randn(shape, device=device, dtype=bench.compute_dtype)
        new_v = torch.randn(shape, device=device, dtype=bench.compute_dtype)
        with torch.inference_mode():
            for _ in range(3):
                bench.inputs(batch)
            gather = [timed(lambda b=batch: bench.inputs(b), device) for _ in range(repeats)]
            # Write into the rows (their step-s slot is already masked out of the window: the
            # figures after this do not depend on what it holds).
            for _ in range(3):
                bench.pool.write(rows, steps, new_k, new_v)
            write = [
                timed(
                    lambda r=rows, s=steps, k=new_k, v=new_v: bench.pool.write(r, s, k, v),
                    device,
                )
                for _ in range(repeats)
            ]
        out[str(batch)] = {
            "gather_and_layout": stats(gather),
            "write_new_kv": stats(write),
        }
    return out


# -- 3. tokenizer ---------------------------------------------------------------------------


def time_tokenizer(
    model: GR2Policy, device: torch.device, batches: list[int], repeats: int
) -> dict[str, Any]:
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(
        0,
        256,
        (max(batches), len(cfg.views), cfg.image_size, cfg.image_size, 3),
        generator=gen,
        dtype=torch.uint8,
    ).to(device)
    out: dict[str, Any] = {
        "views_per_episode": len(cfg.views),
        "image_size": cfg.image_size,
        "tokens_per_view": cfg.tokens_per_view,
        "batches": {},
    }
    first = None
    with torch.inference_mode():
        for batch in batches:
            log(f"tokenizer batch {batch} ...")
            x = images[:batch]
            for _ in range(3):
                model.tokenize_images(x)
            seconds = [timed(lambda x=x: model.tokenize_images(x), device) for _ in range(repeats)]
            median = float(np.median(seconds))
            per_episode = median / batch
            first = per_episode if first is None else first
            row = stats(seconds)
            row["per_episode_ms"] = ms(per_episode)
            row["per_view_ms"] = ms(per_episode / len(cfg.views))
            row["batching_gain"] = round(first / per_episode, 2)
            out["batches"][str(batch)] = row
    return out


# -- 5. machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 (an optional package that fails to import: not there)
        return None


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat (0, 0 elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    return 0, 0


def other_load(start: tuple[int, int], own_cpu_s: float) -> float | None:
    """Share of the machine's CPU time since ``start`` used by other processes."""
    busy, total = cpu_ticks()
    if total <= start[1]:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    other = (busy - start[0]) / tick - own_cpu_s
    return round(max(0.0, other) / ((total - start[1]) / tick), 3)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": version("onnxruntime"),
        "onnx": version("onnx"),
        "tensorrt": version("tensorrt"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }
    return info


# -- main ------------------------------------------------------------------------------------


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[int]:
    """Point fd 1 at stderr for the block (exporters, compilers and loggers that print stay
    off the JSON); yields a duplicate of the real stdout."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    try:
        yield real
    finally:
        sys.stdout.flush()
        os.dup2(real, 1)
        os.close(real)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset", default="gr2-tiny", choices=PRESETS, help="model measured by the runners"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda[:N]")
    parser.add_argument(
        "--runners",
        default=argparse.SUPPRESS,
        help="comma-separated runners to time (default: eager,onnx,compile on cpu; "
        "eager,compile,onnx,tensorrt on cuda)",
    )
    parser.add_argument(
        "--batches",
        default="1,8,32",
        help="comma-separated batch sizes (episodes per step); the first is the baseline of "
        "the batching gain, and they are the compile/TensorRT buckets",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="compute precision of the runners (bf16/fp16 need --device cuda)",
    )
    parser.add_argument(
        "--cache-dtype",
        default="fp32",
        choices=tuple(CACHE_DTYPES),
        help="storage dtype of the KV pool the inputs are gathered from",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per runner and batch")
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed calls per runner before each of its interleaved timing rounds",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch (and ONNX Runtime) threads; 0 = torch's"
    )
    parser.add_argument(
        "--gpu-gb", type=float, default=80.0, help="GPU memory (GB, 1e9) of the kv_cache table"
    )
    parser.add_argument(
        "--pool-fraction",
        type=float,
        default=0.9,
        help="share of that memory the KV pool may use in the kv_cache table",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="where the ONNX export, TensorRT engines and inductor's caches go (default: a "
        "fresh temporary directory, so export, build and compile times are cold; pass a "
        "directory to reuse them across runs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    if args.batches[0] < 1:
        parser.error("--batches must be positive")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU")
    if args.precision != "fp32" and device.type != "cuda":
        parser.error(f"--precision {args.precision} needs --device cuda")
    if "runners" not in args:
        args.runners = (
            "eager,compile,onnx,tensorrt" if device.type == "cuda" else "eager,onnx,compile"
        )
    args.runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    args.device = device
    if "cache_dir" not in args:
        args.cache_dir = None
    return args


def main() -> None:
    args = parse_args()
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device: torch.device = args.device
    configure_logging("info", json_lines=False)  # runners' logs to stderr, not stdout
    half = autocast_dtype(args.precision)
    compute_dtype = half if (half is not None and device.type == "cuda") else torch.float32

    with stdout_to_stderr() as real_stdout:
        result: dict[str, Any] = {"benchmark": "engine", "machine": machine_info(device)}
        result["settings"] = {
            "preset": args.preset,
            "precision": args.precision,
            "kv_pool_dtype": args.cache_dtype,
            "batches": args.batches,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "timing": f"{ROUNDS} interleaved rounds per batch, each running every runner "
            f"{args.warmup} untimed + {max(1, -(-args.repeats // ROUNDS))} timed calls",
        }
        result["kv_cache"] = kv_cache_table(args.gpu_gb * 1e9, args.pool_fraction)

        log(f"building {args.preset} on {device} ...")
        model = init_random_policy(args.preset, seed=0).to(device)
        bench = StepBench(
            model, device, compute_dtype, CACHE_DTYPES[args.cache_dtype], max(args.batches)
        )
        flops = step_flops(model, compute_dtype)
        flops["matmul_reference"] = matmul_gflops(device, compute_dtype)

        with contextlib.ExitStack() as stack:
            cache_dir = args.cache_dir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="gr2-bench-engine-"))
            )
            # inductor's caches too: compile times are cold unless --cache-dir is reused
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
            runners, reports = build_runners(args.runners, model, bench, args, cache_dir)
            # other processes' CPU use while timing (after the compilers' subprocesses)
            ticks, own = cpu_ticks(), time.process_time()
            eager = runners.get("eager")
            if eager is None:
                eager = make_runner(
                    "eager", StepFunction(model), device=device, precision=args.precision
                )
            largest = bench.inputs(max(args.batches))
            reference = eager.run(largest)
            checks = parity(runners, reference, largest)
            timings = time_runners(runners, bench, args.batches, flops, args)
        for name, report in reports.items():
            if name in runners:
                report["parity_vs_eager_batch"] = max(args.batches)
                report["parity_vs_eager"] = checks[name]
                report["batches"] = timings[name]
        result["runners"] = reports

        per_episode_bytes, weight_bytes = flops.pop("_per_episode_bytes"), flops.pop("_weights")
        flop = flops.pop("_flop")
        flops["arithmetic_intensity_flop_per_byte"] = {
            str(b): round(b * flop / (weight_bytes + b * per_episode_bytes), 1)
            for b in args.batches
        }
        flops["achieved_gflops"] = {
            name: {b: row["gflops"] for b, row in timings[name].items()} for name in runners
        }
        flops["achieved_share_of_matmul"] = {
            name: {
                b: round(row["gflops"] / flops["matmul_reference"]["gflops"], 3)
                for b, row in timings[name].items()
            }
            for name in runners
        }
        result["flops"] = flops

        log("pool gather / write ...")
        result["pool_io"] = time_pool_io(bench, args.batches, args.repeats)
        result["tokenizer"] = time_tokenizer(model, device, args.batches, args.repeats)
        result["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
        result["machine"]["other_processes_cpu_share_while_timing"] = other_load(
            ticks, time.process_time() - own
        )
        result["wall_s"] = round(time.perf_counter() - wall, 1)

        text = json.dumps(result, indent=2)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
            log(f"wrote {args.out}")
        with os.fdopen(os.dup(real_stdout), "w") as stdout:
            stdout.write(text + "\n")


if __name__ == "__main__":
    main()
