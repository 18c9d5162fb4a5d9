"""``gr2-train``: the three GR-2 training stages.

    gr2-train tokenizer --data DIR [--preset gr2-tiny] --out RUNS/tok
    gr2-train pretrain  --data DIR --init RUNS/tok --out RUNS/pre
    gr2-train finetune  --data DIR --init RUNS/pre --out RUNS/ft       (or --init RUNS/tok)

Each writes RUN_DIR/checkpoint (servable: ``gr2-policy-server serve --checkpoint``), periodic
checkpoints for --resume, metrics.jsonl and summary.json (also printed, as JSON). Under
``torchrun --nproc_per_node N gr2-train ...`` it trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from gr2_policy.errors import GR2Error
from gr2_policy.model.config import PRESETS

from gr2_training.dataset import DatasetError
from gr2_training.train.errors import TrainingError
from gr2_training.train.loop import run
from gr2_training.train.settings import Settings

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    # VQGAN: bigger batches of single frames, no weight decay.
    "tokenizer": {"steps": 3000, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0},
    "pretrain": {"steps": 2000, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01},
    "finetune": {"steps": 3000, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01},
}


def parse_override(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE as JSON when it parses (numbers, true, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _common(p: argparse.ArgumentParser, stage: str) -> None:
    d = STAGE_DEFAULTS[stage]
    p.add_argument("--data", required=True, help="dataset directory (gr2_training.dataset)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps (%(default)s)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help="examples per step and process (%(default)s)",
    )
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (%(default)s)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (%(default)s)")
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=0.1,
        help="cosine decay ends at lr x this (%(default)s)",
    )
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0, help="fixes init and data order")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (%(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--num-workers", type=int, default=0, help="batch-preparing processes")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--save-every", type=int, default=500, help="periodic checkpoint every N steps")
    p.add_argument("--keep", type=int, default=2, help="periodic checkpoints kept (%(default)s)")
    p.add_argument("--log-every", type=int, default=10, help="metrics line every N steps")
    p.add_argument(
        "--save-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="weights of the final checkpoint (float16 halves its size)",
    )
    p.add_argument("--val-episodes", type=int, default=0, help="episodes held out for eval")
    p.add_argument("--eval-every", type=int, default=0, help="validation every N steps")
    p.add_argument("--tasks", default=None, help="comma-separated tasks to train on (default all)")
    p.add_argument("--success-only", action="store_true", help="only episodes that succeeded")
    p.add_argument(
        "--resume", action="store_true", help="continue RUN_DIR from its last checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gr2-train",
        description="Train GR-2: tokenizer (VQGAN) -> pretrain (video only) -> finetune "
        "(video + actions).",
    )
    sub = parser.add_subparsers(dest="stage", required=True)

    tok = sub.add_parser("tokenizer", help="train the VQGAN image tokenizer on dataset frames")
    _common(tok, "tokenizer")
    tok.add_argument("--preset", default="gr2-tiny", choices=sorted(PRESETS))
    tok.add_argument(
        "--override",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="change one GR2Config field of the preset (repeatable), e.g. codebook_size=256",
    )
    tok.add_argument(
        "--init",
        default=None,
        help="start from this checkpoint / run instead of a fresh --preset model",
    )
    tok.add_argument("--frame-stride", type=int, default=1, help="use every N-th step's frames")
    tok.add_argument(
        "--restart-dead-codes-every",
        type=int,
        default=100,
        help="restart codes unused over N steps at encoder outputs (0: off)",
    )
    tok.add_argument(
        "--local-weight",
        type=float,
        default=0.0,
        help="weight of a per-token linear reconstruction of each code's own patch, which "
        "keeps a small object's colour in its own token (0: off)",
    )

    for name, text in (
        ("pretrain", "video-only pre-training (next-frame tokens; states/actions dropped)"),
        ("finetune", "robot fine-tuning (next-frame tokens + CVAE actions)"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p, name)
        p.add_argument(
            "--init",
            required=True,
            metavar="RUN_DIR_OR_CHECKPOINT",
            help="weights to start from: a checkpoint or a run directory (its checkpoint/)",
        )
        p.add_argument(
            "--override",
            action="append",
            type=parse_override,
            default=[],
            metavar="KEY=VALUE",
            help="change one GR2Config field of the --init model (repeatable), e.g. "
            "lang_to_tokens=true or text_encoder=words; tensors that still fit are kept, "
            "new ones start fresh (tokenizer fields cannot change)",
        )
        p.add_argument(
            "--clip-length",
            type=int,
            default=None,
            help="steps per training clip T (default 2h; > h so the window is learned)",
        )
        p.add_argument(
            "--text-encoder",
            choices=("frozen", "train"),
            default="frozen",
            help="keep the text encoder frozen (GR-2's choice, default) or train it with the "
            "GPT (e.g. the built-in byte encoder, which has no pre-trained weights)",
        )
        p.add_argument(
            "--start-fraction",
            type=float,
            default=0.0,
            metavar="F",
            help="the fraction of clips that begin at an episode's first step, where only "
            "the images and the instruction say where to go (default 0: windows uniformly)",
        )
        p.add_argument(
            "--token-cache",
            default=None,
            help="share image-token caches between runs (default RUN_DIR/token_cache)",
        )
        if name == "finetune":  # pre-training never sees states
            p.add_argument(
                "--state-dropout",
                type=float,
                default=0.0,
                metavar="P",
                help="the fraction of clips whose states are all hidden (the 'no "
                "state' token), so the actions must come from the images and the instruction; "
                "without it a policy can copy the arm's motion from its state history and "
                "ignore both (default 0)",
            )
        for term in ("image", "arm", "gripper", "kl"):
            p.add_argument(
                f"--{term}-weight",
                type=float,
                default=None,
                help=f"loss weight of the {term} term (default: the stage's)",
            )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    values["progress"] = not args.no_progress
    values["tasks"] = [t for t in args.tasks.split(",") if t] if args.tasks else None
    values["overrides"] = dict(args.override)
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gr2-train``; returns the exit status (0 ok, 2 a problem to fix)."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    try:
        summary = run(settings)
    except (TrainingError, DatasetError, GR2Error) as err:
        print(f"gr2-train {settings.stage}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"gr2-train {settings.stage}: interrupted; continue with the same command and "
            "--resume (from the last periodic checkpoint)",
            file=sys.stderr,
        )
        return 130
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
