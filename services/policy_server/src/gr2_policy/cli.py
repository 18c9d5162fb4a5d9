"""`gr2-policy-server`: serve the policy, write a checkpoint, describe a model."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from gr2_policy.errors import CheckpointError, GR2Error
from gr2_policy.logs import configure_logging
from gr2_policy.settings import ServerSettings

# CLI flag -> settings field; each flag overrides its GR2_* environment variable.
_SERVE_FLAGS = {
    "--host": ("host", str),
    "--grpc-port": ("grpc_port", int),
    "--http-port": ("http_port", int),
    "--redis-url": ("redis_url", str),
    "--checkpoint": ("checkpoint", Path),
    "--preset": ("preset", str),
    "--seed": ("seed", int),
    "--device": ("device", str),
    "--torch-threads": ("torch_threads", int),
    "--kv-cache": ("kv_cache", str),
    "--runner": ("runner", str),
    "--precision": ("precision", str),
    "--kv-pool-bytes": ("kv_pool_bytes", int),
    "--kv-cache-dtype": ("kv_cache_dtype", str),
    "--max-batch-size": ("max_batch_size", int),
    "--max-batch-delay-ms": ("max_batch_delay_ms", float),
    "--engine-cache-dir": ("engine_cache_dir", Path),
    "--replica": ("replica", str),
    "--rate-limit-rps": ("rate_limit_rps", float),
    "--rate-limit-burst": ("rate_limit_burst", int),
    "--tls-cert-file": ("tls_cert_file", Path),
    "--tls-key-file": ("tls_key_file", Path),
    "--tls-client-ca-file": ("tls_client_ca_file", Path),
    "--health-port": ("health_port", int),
    "--log-level": ("log_level", str),
}


def _cmd_serve(args: argparse.Namespace) -> int:
    overrides = {
        field: getattr(args, flag.lstrip("-").replace("-", "_"))
        for flag, (field, _) in _SERVE_FLAGS.items()
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None
    }
    if args.random_weights:
        overrides["random_weights"] = True
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        print(f"gr2-policy-server: invalid settings: {problems}", file=sys.stderr)
        return 2
    if settings.checkpoint is not None and settings.random_weights:
        print(
            "gr2-policy-server: --checkpoint and --random-weights exclude each other",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_level, settings.log_json)
    from gr2_policy.api.auth import AccessGuard
    from gr2_policy.api.tls import load_server_tls

    try:  # before the model loads: bad keys or TLS files fail in a moment, not after it
        AccessGuard.from_settings(settings)
        load_server_tls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    except GR2Error as err:
        print(f"gr2-policy-server: {err}", file=sys.stderr)
        return 2
    from gr2_policy.server import serve

    try:
        asyncio.run(serve(settings))
    except CheckpointError as err:
        print(f"gr2-policy-server: cannot load checkpoint: {err}", file=sys.stderr)
        return 2
    except (OSError, GR2Error) as err:  # e.g. a KV budget below one episode, no TensorRT
        print(f"gr2-policy-server: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_init_checkpoint(args: argparse.Namespace) -> int:
    from gr2_policy.model.checkpoint import init_random_policy, model_hash, save_checkpoint
    from gr2_policy.model.config import GR2Config

    try:
        config = GR2Config.from_preset(args.preset)
    except ValueError as err:
        print(f"gr2-policy-server: {err}", file=sys.stderr)
        return 2
    if config.text_encoder == "clip" and args.clip_dir is None:
        print(
            f"gr2-policy-server: {args.preset} uses CLIP's text tower: pass --clip-dir with a "
            "local CLIP directory (config.json, model.safetensors, vocab.json, merges.txt)",
            file=sys.stderr,
        )
        return 2
    model = init_random_policy(args.preset, seed=args.seed)
    if args.clip_dir is not None:
        from gr2_policy.model.clip_text import CLIPTextEncoder, load_clip_text_weights

        if not isinstance(model.text_encoder, CLIPTextEncoder):
            print(f"gr2-policy-server: {args.preset} has no CLIP text encoder", file=sys.stderr)
            return 2
        try:
            load_clip_text_weights(model.text_encoder, args.clip_dir)
        except CheckpointError as err:
            print(f"gr2-policy-server: {err}", file=sys.stderr)
            return 2
    save_checkpoint(model, args.out)
    print(
        json.dumps(
            {
                "checkpoint": str(args.out),
                "preset": args.preset,
                "seed": args.seed,
                "model_version": model_hash(model),
            }
        )
    )
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    import torch

    from gr2_policy.model import GR2Config, GR2Policy
    from gr2_policy.model.checkpoint import count_parameters, load_checkpoint

    try:
        if args.checkpoint is not None:
            model = load_checkpoint(args.checkpoint)
        else:
            config = GR2Config.from_preset(args.preset)
            with torch.device("meta"):  # shapes only: instant, even for gr2-base
                model = GR2Policy(config)
    except (CheckpointError, ValueError) as err:
        print(f"gr2-policy-server: {err}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"config": model.config.to_dict(), "parameters": count_parameters(model)}, indent=2
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gr2-policy-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve gRPC + HTTP (defaults: 127.0.0.1, gRPC 50051, HTTP 8000)",
        description="Each flag overrides the matching GR2_* environment variable. API keys "
        "come from GR2_API_KEYS only: a command line is visible to every user of the machine "
        "(see docs/security.md).",
    )
    for flag, (field, kind) in _SERVE_FLAGS.items():
        doc = ServerSettings.model_fields[field].description
        env = f"GR2_{field.upper()}"
        serve.add_argument(flag, type=kind, default=None, help=f"{doc} (env {env})")
    serve.add_argument(
        "--random-weights",
        action="store_true",
        help=f"{ServerSettings.model_fields['random_weights'].description} "
        "(env GR2_RANDOM_WEIGHTS)",
    )
    serve.set_defaults(func=_cmd_serve)

    init = sub.add_parser("init-checkpoint", help="write randomly initialised weights")
    init.add_argument("--preset", default="gr2-tiny")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", type=Path, required=True, help="directory to write")
    init.add_argument(
        "--clip-dir",
        type=Path,
        help="local CLIP directory (HF layout) whose text tower replaces the random one; "
        "required by presets with a CLIP text encoder (gr2-base)",
    )
    init.set_defaults(func=_cmd_init_checkpoint)

    describe = sub.add_parser("describe", help="print config and parameter counts as JSON")
    group = describe.add_mutually_exclusive_group()
    group.add_argument("--preset", default="gr2-tiny")
    group.add_argument("--checkpoint", type=Path)
    describe.set_defaults(func=_cmd_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
