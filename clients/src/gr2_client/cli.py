"""`gr2`: command-line client for a GR-2 policy server.

Commands: `info` (the served model), `predict-video` (the model's imagined next frames from
one observation, written as a GIF/PNG/JSON), `run-episode` (one episode on the simulated Gen3,
through the `gr2-wbc-agent` program) and `bench` (round-trip latency of Act and StreamActions).

Progress goes to stderr (a live display on a terminal, plain lines otherwise or with
--no-progress); results go to stdout. Exit codes: 0 ok, 1 the server or the episode failed
(a one-line message with the gRPC status), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from gr2.v1 import policy_pb2 as pb

from gr2_client.client import PolicyClient
from gr2_client.convert import PredictedFrame, ServerDescription
from gr2_client.errors import ClientError
from gr2_client.tls import TlsConfig

AGENT = "gr2-wbc-agent"
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments or input files: exit code 2."""


class CommandFailedError(Exception):
    """The command ran but did not succeed (e.g. the episode failed): exit code 1."""


# ---------------------------------------------------------------------------------- output


class Ui:
    """Progress on stderr: rich when stderr is a terminal (and not --no-progress), else
    plain lines."""

    def __init__(self, enabled: bool) -> None:
        self.rich = enabled and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self._console: Any = None
        if self.rich:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)

    def line(self, message: str, style: str | None = None) -> None:
        if self._console is not None:
            self._console.print(message, style=style, markup=False)
        else:
            print(message, file=sys.stderr, flush=True)

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[str], None]]:
        """Yield ``step(message)``: advances by one and shows the message."""
        if self._console is None:
            count = 0

            def plain_step(message: str) -> None:
                nonlocal count
                count += 1
                of = f"/{total}" if total else ""
                print(f"{description} {count}{of}: {message}", file=sys.stderr, flush=True)

            yield plain_step
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=self._console,
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=total, note="")

            def rich_step(message: str) -> None:
                bar.update(task, advance=1, note=message)

            yield rich_step


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


# ------------------------------------------------------------------------------------ info


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The --tls* options as a TlsConfig (None: plaintext); UsageError for a client
    certificate without its key (or the reverse) or a file that is not there."""
    given = {
        "--tls-ca": args.tls_ca,
        "--tls-cert": args.tls_cert,
        "--tls-key": args.tls_key,
    }
    if not (args.tls or args.tls_server_name or any(given.values())):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together (a client certificate and its key)")
    for flag, path in given.items():
        if path and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    return TlsConfig(
        ca_file=args.tls_ca or None,
        cert_file=args.tls_cert or None,
        key_file=args.tls_key or None,
        server_name_override=args.tls_server_name or None,
    )


def _client(args: argparse.Namespace) -> PolicyClient:
    return PolicyClient(
        args.server, api_key=args.api_key, timeout_s=args.timeout, tls=tls_config(args)
    )


def _cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
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


# --------------------------------------------------------------------------- predict-video


def _views_text(desc: ServerDescription) -> str:
    return ", ".join(f"{name} ({w}x{h})" for name, w, h in desc.views)


def load_view_images(paths: list[Path], desc: ServerDescription, *, resize: bool) -> dict[str, Any]:
    """One image per served view, in the server's view order, checked against its sizes."""
    from gr2_client.media import load_rgb

    expected = f"{len(desc.views)} image(s), one per served view in this order: {_views_text(desc)}"
    if len(paths) != len(desc.views):
        raise UsageError(f"got {len(paths)} image(s), the server expects {expected}")
    images = {}
    for path, (name, width, height) in zip(paths, desc.views, strict=True):
        if not path.is_file():
            raise UsageError(f"image for view {name!r} not found: {path}")
        try:
            rgb = load_rgb(path, (width, height) if resize else None)
        except OSError as err:
            raise UsageError(f"cannot read image for view {name!r} ({path}): {err}") from None
        got_h, got_w = rgb.shape[:2]
        if (got_w, got_h) != (width, height):
            raise UsageError(
                f"image for view {name!r} ({path}) is {got_w}x{got_h}, the server expects "
                f"{width}x{height} (served views: {_views_text(desc)}; --resize scales images)"
            )
        images[name] = rgb
    return images


def parse_state(text: str) -> pb.RobotState:
    """``x,y,z,qw,qx,qy,qz,g``: tool position [m], orientation (wxyz) and gripper (0..1)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 8:
        raise UsageError(f"--state needs 8 numbers x,y,z,qw,qx,qy,qz,g; got {text!r}")
    return pb.RobotState(ee_position=values[:3], ee_quat_wxyz=values[3:7], gripper=values[7])


def _sampling(args: argparse.Namespace) -> pb.Sampling:
    if args.sampling == "greedy":
        return pb.Sampling(mode=pb.SAMPLING_MODE_GREEDY)
    return pb.Sampling(
        mode=pb.SAMPLING_MODE_TOP_K,
        top_k=args.top_k,
        temperature=args.temperature,
        seed=args.seed,
    )


def _cmd_predict_video(args: argparse.Namespace) -> int:
    from gr2_client.media import OUTPUT_SUFFIXES, write_frames

    out: Path = args.out
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"-o {out}: the suffix picks the format: {', '.join(OUTPUT_SUFFIXES)}")
    if args.frames < 1:
        raise UsageError("--frames must be at least 1")
    if args.scale < 1:
        raise UsageError("--scale must be at least 1")
    state = parse_state(args.state) if args.state else None
    ui = Ui(not args.no_progress)
    with _client(args) as client:
        desc = client.server_info()
        images = load_view_images(args.images, desc, resize=args.resize)
        frames: list[PredictedFrame] = []
        t0 = time.perf_counter()
        with ui.progress("predicting frames", args.frames) as step:
            for frame in client.predict_video(
                args.instruction,
                images,
                num_frames=args.frames,
                state=state,
                sampling=_sampling(args),
                encoding=args.encoding,
            ):
                frames.append(frame)
                step(f"frame {frame.frame_index} after {time.perf_counter() - t0:.2f} s")
    if not frames:
        raise CommandFailedError("the server returned no frames")
    order = [name for name, _, _ in desc.views]
    meta = {
        "instruction": args.instruction,
        "model_version": desc.model_version,
        "views": order,
        "sampling": args.sampling,
    }
    write_frames(frames, out, order=order, scale=args.scale, frame_ms=args.frame_ms, meta=meta)
    print(
        f"wrote {out} ({len(frames)} frames, views {' | '.join(order)}, "
        f"{time.perf_counter() - t0:.2f} s)"
    )
    return 0


# ----------------------------------------------------------------------------- run-episode


def find_agent() -> str | None:
    """`gr2-wbc-agent` next to this Python (same venv) or on PATH."""
    beside = Path(sys.executable).parent / AGENT
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(AGENT)


def episode_report(summary: dict[str, Any]) -> list[str]:
    """Human-readable lines from the agent's summary JSON."""
    task = summary.get("task") or {}
    if summary.get("error"):
        verdict = f"FAILED: {summary['error']}"
    elif "success" in task:
        verdict = "task succeeded" if task["success"] else "task not achieved"
    else:
        verdict = "completed (no task check: use --task for a success verdict)"
    lat = summary.get("chunk_latency") or {}
    lines = [
        f"episode      {summary.get('episode_id')}",
        f"instruction  {summary.get('instruction')!r}",
        f"result       {verdict}",
        f"steps        {summary.get('steps')} of {summary.get('requested_steps')}",
    ]
    if lat:
        lines.append(
            "chunk round trip  p50 {} p90 {} p99 {}".format(
                *(_ms(lat.get(f"round_trip_p{q}_s")) for q in (50, 90, 99))
            )
        )
        lines.append(
            "server compute    p50 {} p99 {}, queue p50 {}".format(
                _ms(lat.get("server_compute_p50_s")),
                _ms(lat.get("server_compute_p99_s")),
                _ms(lat.get("server_queue_p50_s")),
            )
        )
    if "tool_displacement_m" in summary:
        lines.append(f"tool moved   {summary['tool_displacement_m'] * 100:.1f} cm")
    if summary.get("video"):
        lines.append(f"video        {summary['video']}")
    return lines


def _cmd_run_episode(args: argparse.Namespace) -> int:
    agent = find_agent()
    if agent is None:
        raise CommandFailedError(
            f"{AGENT} is not installed (looked next to {sys.executable} and on PATH): install "
            "the agent (pip install -e services/wbc_agent, or `make install`) to run episodes"
        )
    if not args.instruction and not args.task:
        raise UsageError("run-episode needs --instruction TEXT or --task NAME")
    with tempfile.TemporaryDirectory(prefix="gr2-episode-") as tmp:
        out_dir = args.out or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary_path = out_dir / "summary.json"
        cmd = [
            agent, "run", "--robot", "sim", "--server", args.server,
            "--steps", str(args.steps), "--seed", str(args.seed),
            "--metrics-port", "0", "--summary", str(summary_path),
        ]  # fmt: skip
        if args.instruction:
            cmd += ["--instruction", args.instruction]
        if args.task:
            cmd += ["--task", args.task]
        if args.max_seconds is not None:
            cmd += ["--max-seconds", str(args.max_seconds)]
        if args.out is not None:
            cmd += ["--video", str(out_dir / "episode.mp4")]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if args.api_key:
            env["GR2_WBC_API_KEY"] = args.api_key
        tls = tls_config(args)
        if tls is not None:
            env["GR2_WBC_TLS"] = "1"
            for name, value in (
                ("GR2_WBC_TLS_CA_FILE", tls.ca_file),
                ("GR2_WBC_TLS_CERT_FILE", tls.cert_file),
                ("GR2_WBC_TLS_KEY_FILE", tls.key_file),
            ):
                if value is not None:
                    env[name] = str(Path(value).resolve())
            if tls.server_name_override:
                env["GR2_WBC_TLS_SERVER_NAME"] = tls.server_name_override
        if "MUJOCO_GL" not in env and not env.get("DISPLAY"):
            env["MUJOCO_GL"] = "egl"  # headless rendering of the sim cameras
        ui = Ui(not args.no_progress)
        ui.line(f"starting {AGENT} on the simulated Gen3 (server {args.server})")
        rc, last_line = _stream_agent(cmd, env, ui, args.verbose)
        if not summary_path.is_file():
            raise CommandFailedError(
                f"{AGENT} exited with {rc} without an episode summary: {last_line or '-'}"
            )
        summary = json.loads(summary_path.read_text())
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for line in episode_report(summary):
            print(line)
        if args.out is not None:
            print(f"summary      {summary_path}")
    if rc != 0:
        raise CommandFailedError(f"{AGENT} exited with {rc}: {summary.get('error') or 'see above'}")
    return 0


def _stream_agent(cmd: list[str], env: dict[str, str], ui: Ui, verbose: bool) -> tuple[int, str]:
    """Run the agent, showing its log lines as they come; returns its exit code and its
    last log line."""
    prefix = f"[{AGENT}] "
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
    )
    assert proc.stderr is not None
    text = ""
    try:
        if ui.rich:
            with ui._console.status("running the episode ...") as status:
                for raw in proc.stderr:
                    text = raw.rstrip().removeprefix(prefix) or text
                    status.update(f"running the episode: {text[:60]}")
                    if verbose or _notable(text):
                        ui.line(f"  {text}", style="dim")
        else:
            for raw in proc.stderr:
                text = raw.rstrip().removeprefix(prefix) or text
                if verbose or _notable(text):
                    ui.line(f"agent: {text}")
        return proc.wait(), text
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        raise


def _notable(text: str) -> bool:
    """Agent lines worth showing without --verbose (skip per-setting chatter)."""
    keys = (
        "running", "first chunk", "reached", "episode", "task", "video", "error", "fail",
        "cannot", "invalid", "incompatible", "stopped",
    )  # fmt: skip
    return any(k in text.lower() for k in keys) or text.startswith(("WARNING", "ERROR"))


# ----------------------------------------------------------------------------------- bench


def _cmd_bench(args: argparse.Namespace) -> int:
    from gr2_client.bench import run_bench

    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    ui = Ui(not args.no_progress)
    with _client(args) as client, ui.progress("Act + StreamActions", 2 * args.steps) as step:
        result = run_bench(
            client,
            args.steps,
            instruction=args.instruction,
            seed=args.seed,
            on_step=lambda kind, i, rt: step(f"{kind} {i + 1}: {rt * 1e3:.1f} ms"),
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"server {result['server']}  model {result['model_version']} ({result['preset']})")
    print(f"{args.steps} observations per transport, random images of the served views")
    header = f"{'':15}{'p50':>10}{'p90':>10}{'p99':>10}"
    print(header)
    for transport in ("act", "stream"):
        stats: dict[str, float] = result[transport]  # type: ignore[assignment]
        label = "Act" if transport == "act" else "StreamActions"
        for metric, name in (
            ("round_trip", "round trip"),
            ("server_queue", "  queue"),
            ("server_compute", "  compute"),
        ):
            row = "".join(f"{_ms(stats.get(f'{metric}_p{q}_s')):>10}" for q in (50, 90, 99))
            print(f"{(label if metric == 'round_trip' else name):15}{row}")
    return 0


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gr2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("GR2_SERVER", "localhost:50051"),
        metavar="HOST:PORT",
        help="policy server gRPC address HOST:PORT (env GR2_SERVER, default localhost:50051)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("GR2_API_KEY"),
        metavar="KEY",
        help="API key sent as 'authorization: Bearer KEY' (env GR2_API_KEY)",
    )
    tls = parser.add_argument_group(
        "TLS", "for a server with GR2_TLS_CERT_FILE (and GR2_TLS_CLIENT_CA_FILE: mutual TLS)"
    )
    tls.add_argument(
        "--tls",
        action="store_true",
        default=os.environ.get("GR2_TLS", "").lower() in ("1", "true", "yes", "on"),
        help="connect with TLS, trusting the system's CAs (implied by the other --tls "
        "options; env GR2_TLS)",
    )
    tls.add_argument(
        "--tls-ca",
        default=os.environ.get("GR2_TLS_CA"),
        metavar="PEM",
        help="CA bundle that signed the server's certificate (env GR2_TLS_CA)",
    )
    tls.add_argument(
        "--tls-cert",
        default=os.environ.get("GR2_TLS_CERT"),
        metavar="PEM",
        help="client certificate, for mutual TLS; needs --tls-key (env GR2_TLS_CERT)",
    )
    tls.add_argument(
        "--tls-key",
        default=os.environ.get("GR2_TLS_KEY"),
        metavar="PEM",
        help="the client certificate's unencrypted key (env GR2_TLS_KEY)",
    )
    tls.add_argument(
        "--tls-server-name",
        default=os.environ.get("GR2_TLS_SERVER_NAME"),
        metavar="NAME",
        help="check the server's certificate against NAME instead of the --server host "
        "(env GR2_TLS_SERVER_NAME)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="deadline of each unary call (info, Act, start/end episode), seconds (default 10)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="plain progress lines on stderr instead of a live display",
    )
    # --no-progress is accepted after the command name too (SUPPRESS: unset keeps the global).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--no-progress", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="show the served model, its views and protocol",
        description="Print GetServerInfo: model and version, protocol, camera views (name "
        "and size, in the order requests must use), action chunk and history length.",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_cmd_info)

    video = sub.add_parser(
        "predict-video",
        parents=[common],
        help="predict the next camera frames from one observation and write a GIF",
        description="Send one observation (one image per served view, in view order; see "
        "`gr2 info`) and the instruction to PredictVideo, show each frame as the server "
        "decodes it, and write them by the output's suffix: .gif (animated; each frame is "
        "the views side by side, left to right, over a 2-pixel timeline bar), .png (all "
        "frames stacked top to bottom) or "
        ".json (frame index + base64 PNG per view).",
    )
    video.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE",
        help="one image file per served view, in the server's view order (e.g. head.png "
        "wrist.png); each must have the view's size unless --resize",
    )
    video.add_argument("--instruction", required=True, help="language instruction")
    video.add_argument(
        "--frames", type=int, default=4, metavar="N", help="frames to predict (default 4)"
    )
    video.add_argument(
        "-o",
        "--out",
        type=Path,
        default=Path("prediction.gif"),
        help="output file; .gif, .png or .json (default prediction.gif)",
    )
    video.add_argument(
        "--sampling",
        choices=["greedy", "top_k"],
        default="greedy",
        help="token sampling: greedy (argmax, deterministic; default) or top_k",
    )
    video.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="with top_k: K (0 = all tokens)"
    )
    video.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="with top_k: softmax temperature (default 1.0)",
    )
    video.add_argument(
        "--seed", type=int, default=0, metavar="S", help="with top_k: sampling seed (default 0)"
    )
    video.add_argument(
        "--state",
        default=None,
        metavar="x,y,z,qw,qx,qy,qz,g",
        help="robot state: tool position [m], orientation quaternion (w first), gripper "
        "0..1 (default: none, the model's no-state embedding)",
    )
    video.add_argument(
        "--scale", type=int, default=1, help="enlarge the GIF/PNG by this integer factor"
    )
    video.add_argument(
        "--frame-ms", type=int, default=200, help="GIF frame duration, ms (default 200)"
    )
    video.add_argument(
        "--resize",
        action="store_true",
        help="scale the input images to the served view sizes instead of refusing them",
    )
    video.add_argument(
        "--encoding",
        choices=["raw", "png"],
        default="raw",
        help="how the input images travel: raw RGB (default) or PNG",
    )
    video.set_defaults(func=_cmd_predict_video)

    episode = sub.add_parser(
        "run-episode",
        parents=[common],
        help="run one episode on the simulated Kinova Gen3 (needs gr2-wbc-agent)",
        description=f"Start `{AGENT} run --robot sim` against --server as a subprocess (found "
        "next to this Python or on PATH), show its progress, and print the summary: result, "
        "steps, chunk latency. The simulation renders headless (MUJOCO_GL=egl unless set).",
    )
    episode.add_argument("--instruction", default=None, help="language instruction")
    episode.add_argument(
        "--task",
        default=None,
        help="sim task with a success check (touch, pick, push); its instruction comes from --seed",
    )
    episode.add_argument("--seed", type=int, default=0, help="sim scene seed (default 0)")
    episode.add_argument(
        "--steps", type=int, default=50, help="control steps (observations), default 50"
    )
    episode.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds of robot time even if steps remain",
    )
    episode.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep DIR/summary.json and the camera video DIR/episode.mp4",
    )
    episode.add_argument("--json", action="store_true", help="print the agent's summary JSON")
    episode.add_argument("-v", "--verbose", action="store_true", help="show every agent line")
    episode.set_defaults(func=_cmd_run_episode)

    bench = sub.add_parser(
        "bench",
        parents=[common],
        help="measure Act and StreamActions round trips of a running server",
        description="Start an episode, send N observations (random images of the served "
        "views) through Act, then N through one StreamActions stream (each sent when the "
        "previous chunk arrived), end the episode, and print the round-trip and the "
        "server-reported queue and compute times (p50/p90/p99).",
    )
    bench.add_argument(
        "--steps", type=int, default=20, metavar="N", help="observations per transport (20)"
    )
    bench.add_argument("--instruction", default="touch the red block", help="episode instruction")
    bench.add_argument("--seed", type=int, default=0, help="random image seed (default 0)")
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as err:
        print(f"gr2 {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        name = code.name if code is not None else "ERROR"
        print(f"gr2 {args.command}: {name}: {details} (server {args.server})", file=sys.stderr)
        return EXIT_FAILED
    except (CommandFailedError, ClientError) as err:
        print(f"gr2 {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:
        print(f"gr2 {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"gr2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
