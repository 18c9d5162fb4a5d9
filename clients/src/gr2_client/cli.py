"""`gr2`: command-line client for a GR-2 policy server."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import grpc

from gr2_client.client import PolicyClient


def _cmd_info(args: argparse.Namespace) -> int:
    with PolicyClient(args.server, api_key=args.api_key, timeout_s=args.timeout) as client:
        desc = client.server_info()
    if args.json:
        print(json.dumps(dataclasses.asdict(desc), indent=2))
    else:
        print(f"model      {desc.model_name} {desc.model_version} ({desc.preset})")
        print(f"protocol   {desc.protocol_version}")
        views = ", ".join(f"{n} {w}x{h}" for n, w, h in desc.views)
        print(f"views      {views}")
        print(f"chunk      {desc.action_horizon} waypoints every {desc.waypoint_dt_s:g} s")
        print(f"history    {desc.history} steps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gr2", description=__doc__)
    parser.add_argument(
        "--server",
        default=os.environ.get("GR2_SERVER", "localhost:50051"),
        help="policy server HOST:PORT (env GR2_SERVER, default localhost:50051)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("GR2_API_KEY"),
        help="API key sent as 'authorization: Bearer KEY' (env GR2_API_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="call timeout, seconds")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the served model, its views and protocol")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        name = code.name if code is not None else "ERROR"
        print(f"gr2: {name}: {details} (server {args.server})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
