"""`gr2-eval`: success rates of a served model on held-out sim tasks, through the real path.

Every episode is a real `gr2-wbc-agent run --task T --seed S` process talking gRPC to a real
policy server (one started here from ``--checkpoint``, or an existing one with ``--server``),
on held-out seeds (``gr2_wbc.tasks.eval_seeds``: never seen in training). By default the sim
runs unpaced in lockstep (``--no-realtime``: the 200 Hz controller logic is the same, the loop
waits ``--lockstep-delay`` of robot time after each observation for its chunk); ``--realtime``
runs at wall-clock speed instead.

Writes ``OUT/eval.json`` and ``OUT/eval.md`` (success rate per task, mean steps and time to
success, chunk round trip), the agents' summaries under ``OUT/episodes/``, and for the first
``--videos`` episodes per task ``OUT/videos/<task>_<seed>.mp4`` (the cameras) and, when the
checkpoint is local, ``<task>_<seed>_predicted.mp4``: the real next frames beside the ones
the model predicts (:mod:`gr2_training.predicted_video`, from the agent's recording).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
from gr2_policy.checkpoints import DEMO_CHECKPOINT, bundled_demo_checkpoint
from gr2_wbc.tasks import TASKS, eval_seeds
from tqdm import tqdm

from gr2_training.local_stack import BIN, LocalStack, StackError, child_env, stop_process


def say(message: str) -> None:
    print(f"[gr2-eval] {message}", file=sys.stderr, flush=True)


class AgentProcesses:
    """The live agent processes, so that an interrupted evaluation stops them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, cmd: list[str], log: IO[bytes]) -> subprocess.CompletedProcess:
        with self._lock:
            if self.stopping:
                raise StackError("evaluation interrupted")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
            self._live.add(proc)
        try:
            return subprocess.CompletedProcess(cmd, proc.wait())
        finally:
            with self._lock:
                self._live.discard(proc)

    def stop_all(self) -> None:
        with self._lock:
            self.stopping = True
            live = list(self._live)
        for proc in live:
            stop_process(proc)


_AGENTS = AgentProcesses()


def run_episode(
    target: str, task: str, seed: int, out: Path, args: argparse.Namespace, video: bool
) -> dict[str, Any]:
    """One agent process; returns its summary's essentials (``error`` set on failure)."""
    name = f"{task}_{seed}"
    summary_path = out / "episodes" / f"{name}.json"
    cmd = [
        str(BIN / "gr2-wbc-agent"), "run", "--server", target, "--robot", "sim",
        "--task", task, "--seed", str(seed), "--steps", str(args.max_steps),
        "--summary", str(summary_path), "--metrics-port", "0", "--robot-id", "gr2-eval",
    ]  # fmt: skip
    if not args.realtime:
        cmd += ["--no-realtime", "--lockstep-delay", str(args.lockstep_delay)]
    if video:
        cmd += ["--video", str(out / "videos" / f"{name}.mp4")]
        cmd += ["--record", str(out / "records" / name)]
    log_path = out / "episodes" / f"{name}.log"
    with log_path.open("wb") as log:
        proc = _AGENTS.run(cmd, log)
    row: dict[str, Any] = {"task": task, "seed": seed, "returncode": proc.returncode}
    if video:
        row["record"] = str(out / "records" / name)
    if not summary_path.exists():
        row["error"] = f"agent exited {proc.returncode} without a summary; see {log_path}"
        return row
    summary = json.loads(summary_path.read_text())
    outcome = summary.get("task") or {}
    lat = summary.get("chunk_latency") or {}
    row.update(
        success=bool(outcome.get("success")),
        steps=summary.get("steps", 0),
        success_time_s=outcome.get("success_time_s"),
        round_trip_p50_s=lat.get("round_trip_p50_s"),
        error=summary.get("error"),
    )
    return row


def table(rows: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per task: episodes, successes, success rate, mean steps, mean time to success, and the
    median chunk round trip over episodes [ms]."""
    out = {}
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        ok = [r for r in mine if r.get("success")]
        rtt = [r["round_trip_p50_s"] for r in mine if r.get("round_trip_p50_s") is not None]
        times = [r["success_time_s"] for r in ok if r.get("success_time_s") is not None]
        out[task] = {
            "episodes": len(mine),
            "successes": len(ok),
            "success_rate": len(ok) / len(mine) if mine else float("nan"),
            "mean_steps": float(np.mean([r.get("steps", 0) for r in mine])) if mine else 0.0,
            "mean_time_to_success_s": float(np.mean(times)) if times else None,
            "round_trip_p50_ms": float(np.median(rtt)) * 1e3 if rtt else None,
            "errors": sum(1 for r in mine if r.get("error")),
        }
    return out


def markdown(results: dict[str, dict[str, Any]], command: str) -> str:
    lines = [
        "| task | episodes | success rate | mean steps | mean time to success "
        "| chunk round trip p50 |",
        "|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        t = r["mean_time_to_success_s"]
        rtt = r["round_trip_p50_ms"]
        lines.append(
            f"| {task} | {r['episodes']} | {r['success_rate']:.0%} ({r['successes']}) | "
            f"{r['mean_steps']:.1f} | {'-' if t is None else f'{t:.2f} s'} | "
            f"{'-' if rtt is None else f'{rtt:.1f} ms'} |"
        )
    return "\n".join(lines) + f"\n\nCommand: `{command}`\n"


def predicted_videos(rows: list[dict[str, Any]], checkpoint: Path, out: Path) -> None:
    """Real vs predicted next frames for the recorded episodes (loads the model here)."""
    from gr2_policy.model.checkpoint import load_checkpoint

    from gr2_training.predicted_video import write_predicted_video

    recorded = [r for r in rows if r.get("record")]
    if not recorded:
        return
    policy = load_checkpoint(checkpoint).eval()
    for row in recorded:
        obs = Path(row["record"]) / "observations.npz"
        if not obs.exists():
            continue
        path = out / "videos" / f"{row['task']}_{row['seed']}_predicted.mp4"
        row["predicted_video"] = str(write_predicted_video(policy, obs, path, fps=5.0))
    say(f"predicted-frame videos for {len(recorded)} episodes in {out / 'videos'}")


def evaluate(args: argparse.Namespace, target: str, checkpoint: Path | None) -> dict[str, Any]:
    out: Path = args.out
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [
        (task, seed, i < args.videos)
        for task in args.tasks
        for i, seed in enumerate(eval_seeds(args.episodes, args.seed_offset))
    ]
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(args.workers) as pool, tqdm(total=len(jobs), unit="ep") as bar:
        futures = [pool.submit(run_episode, target, t, s, out, args, v) for t, s, v in jobs]
        try:
            for future in futures:
                row = future.result()
                rows.append(row)
                bar.set_postfix_str(f"{row['task']} {'ok' if row.get('success') else 'fail'}")
                bar.update()
        except BaseException:  # Ctrl-C / SIGTERM: no agent outlives the evaluation
            for future in futures:
                future.cancel()
            _AGENTS.stop_all()
            raise
    if checkpoint is not None:
        predicted_videos(rows, checkpoint, out)
    results = table(rows, args.tasks)
    command = " ".join(["gr2-eval", *sys.argv[1:]])
    report = {"command": command, "results": results, "episodes": rows}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(results, command))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gr2-eval", description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, help=f"comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task")
    p.add_argument("--server", default=None, help="HOST:PORT of a running policy server")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="served here when no --server (default: the bundled demo checkpoint); with "
        "--server, the same model's checkpoint enables the predicted-frame videos",
    )
    p.add_argument("--out", type=Path, default=Path("out/eval"))
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--videos", type=int, default=3, help="episodes per task with a video")
    p.add_argument("--workers", type=int, default=2, help="agents running at once")
    p.add_argument("--max-steps", type=int, default=60, help="observations per episode")
    p.add_argument("--seed-offset", type=int, default=0, help="first held-out seed offset")
    p.add_argument("--realtime", action="store_true", help="run the sim at wall-clock speed")
    p.add_argument("--lockstep-delay", type=float, default=0.1, help="see gr2-wbc-agent run")
    return p


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the evaluation like Ctrl-C: agents and the local stack are stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    if args.episodes < 1 or args.workers < 1 or args.max_steps < 1:
        parser.error("--episodes, --workers and --max-steps must be >= 1")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.server:
            report = evaluate(args, args.server, args.checkpoint)
        else:
            checkpoint = args.checkpoint or bundled_demo_checkpoint()
            if checkpoint is None or not (checkpoint / "config.json").is_file():
                parser.error(
                    f"no checkpoint at {checkpoint or DEMO_CHECKPOINT}: pass --checkpoint DIR "
                    "or --server"
                )
            args.out.mkdir(parents=True, exist_ok=True)
            with LocalStack(checkpoint, args.out, say=say) as stack:
                report = evaluate(args, stack.grpc_target, checkpoint)
    except StackError as err:
        say(str(err))
        return 1
    except KeyboardInterrupt:
        say("interrupted: agents and server stopped")
        return 130
    if args.json:
        print(json.dumps(report["results"], indent=2))
    else:
        print(markdown(report["results"], report["command"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
