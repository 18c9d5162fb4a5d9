"""`gr2-average`: one checkpoint whose weights are the mean of several (a uniform "model soup").

Fine-tuning runs that continue one another from the same pre-trained model end in nearby
points of weight space; their mean often generalises better than any one of them (stochastic
weight averaging makes the same bet along one run). The demo recipe averages the final
checkpoints of its last fine-tuning cycles (README, "The demo model")::

    gr2-average --out runs/demo/ft_avg --save-dtype float16 \\
        runs/demo/ft_recovery2 runs/demo/ft_recovery3 runs/demo/ft runs/demo/ft_conf

Each input is a checkpoint directory or a finished run directory (its ``checkpoint/``), as for
``gr2-train --init``. All must share one model config. The mean is taken in float32 and written
as ``OUT/checkpoint`` (the policy server's format, so ``--init OUT`` and ``--checkpoint
OUT/checkpoint`` both work) with ``OUT/summary.json`` naming the inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from gr2_policy.model import GR2Policy, model_hash

from gr2_training.train import checkpointing as ckpt
from gr2_training.train.errors import TrainingError


def _config_difference(a: GR2Policy, b: GR2Policy) -> list[str]:
    da, db = a.config.to_dict(), b.config.to_dict()
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in sorted(da) if da[k] != db.get(k)]


def average_policies(policies: Sequence[GR2Policy]) -> GR2Policy:
    """The first policy with every floating-point tensor replaced by the mean over all of them
    (computed in float32). Other tensors (integer buffers) must be equal across the inputs."""
    if len(policies) < 2:
        raise TrainingError("averaging needs at least two checkpoints")
    first = policies[0]
    for i, other in enumerate(policies[1:], start=2):
        diff = _config_difference(first, other)
        if diff:
            raise TrainingError(
                f"checkpoint {i} has another model config than checkpoint 1: " + "; ".join(diff)
            )
    states = [p.state_dict() for p in policies]
    mean: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        if ref.is_floating_point():
            # from the first, not from zeros: a tensor the inputs share (a frozen tokenizer)
            # stays bit-identical, -0.0 included
            total = ref.float().clone()
            for state in states[1:]:
                total += state[name].float()
            mean[name] = (total / len(states)).to(ref.dtype)
        else:
            if any(not torch.equal(state[name], ref) for state in states[1:]):
                raise TrainingError(f"non-float tensor {name} differs between the checkpoints")
            mean[name] = ref
    first.load_state_dict(mean, strict=True)
    return first


def average_checkpoints(inputs: Sequence[str | Path], out: Path, save_dtype: str) -> dict:
    """Load ``inputs``, write their mean as ``out/checkpoint``; returns the summary."""
    if save_dtype not in ckpt.SAVE_DTYPES:
        raise TrainingError(
            f"--save-dtype must be one of {sorted(ckpt.SAVE_DTYPES)}, got {save_dtype!r}"
        )
    if len(inputs) < 2:
        raise TrainingError("averaging needs at least two checkpoints")
    paths = [ckpt.resolve_init(p) for p in inputs]
    device = torch.device("cpu")
    policies = []
    for i, path in enumerate(paths, start=1):
        print(f"[gr2-average] loading {i}/{len(paths)}: {path}", file=sys.stderr, flush=True)
        policies.append(ckpt.load_policy(path, device))
    averaged = average_policies(policies)
    out.mkdir(parents=True, exist_ok=True)
    final = ckpt.save_final(out, averaged, save_dtype)
    summary = {
        "stage": "average",
        "inputs": [str(p) for p in paths],
        "checkpoint": str(final),
        "save_dtype": save_dtype,
        "model_version": model_hash(ckpt.load_policy(final, device)),
    }
    (out / ckpt.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gr2-average",
        description="Write the mean of several checkpoints' weights (same model config) as "
        "OUT/checkpoint.",
    )
    parser.add_argument(
        "checkpoints", nargs="+", help="checkpoint directories or finished run directories"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument(
        "--save-dtype",
        default="float32",
        choices=sorted(ckpt.SAVE_DTYPES),
        help="dtype of the written weights (default float32)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gr2-average``; 0 on success, 2 on a checkpoint problem."""
    args = build_parser().parse_args(argv)
    try:
        summary = average_checkpoints(args.checkpoints, args.out, args.save_dtype)
    except TrainingError as err:
        print(f"gr2-average: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
