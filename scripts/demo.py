"""`make demo`: policy server + WBC agent + simulated Gen3 running one episode.

Starts a throw-away redis-server (episode store), the policy server and the agent as separate
processes on loopback, runs one episode, and writes to --out:
  episode.mp4    head and wrist cameras side by side
  summary.json   "success" and the task check, steps, chunk latency percentiles, loop timing,
                 arm motion, the episode record
  *.log          each process's log
Everything it starts is stopped again, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from gr2_policy.checkpoints import bundled_demo_checkpoint
from gr2_training.local_stack import BIN, LocalStack, StackError, child_env

ROOT = Path(__file__).resolve().parents[1]


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--task", default="touch", help="sim task (gr2_wbc.tasks)")
    parser.add_argument(
        "--seed", type=int, default=1_000_000, help="scene seed (held out from training)"
    )
    parser.add_argument("--steps", type=int, default=60, help="most control steps (observations)")
    parser.add_argument("--no-redis", action="store_true", help="use the in-process store")
    args = parser.parse_args()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = child_env()
    bundled = bundled_demo_checkpoint()
    if bundled is not None:
        checkpoint = bundled
        say(f"checkpoint: bundled {checkpoint}")
    else:
        checkpoint = out / "checkpoint"
        say(f"no bundled checkpoint: writing random gr2-tiny weights to {checkpoint}")
        subprocess.run(
            [str(BIN / "gr2-policy-server"), "init-checkpoint", "--preset", "gr2-tiny",
             "--seed", "0", "--out", str(checkpoint)],
            check=True, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        with LocalStack(checkpoint, out, redis=not args.no_redis, say=say) as stack:
            return run_episode(args, out, stack, checkpoint)
    except StackError as err:
        say(str(err))
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130


def run_episode(args: argparse.Namespace, out: Path, stack: LocalStack, checkpoint: Path) -> int:
    """Run the agent for one episode against ``stack``; write the summary."""
    agent_summary = out / "agent_summary.json"
    video = out / "episode.mp4"
    say(f"running the agent: task {args.task!r}, seed {args.seed}, on the simulated Gen3")
    agent = subprocess.run(
        [
            str(BIN / "gr2-wbc-agent"),
            "run",
            "--server",
            stack.grpc_target,
            "--robot",
            "sim",
            "--task",
            args.task,
            "--steps",
            str(args.steps),
            "--seed",
            str(args.seed),
            "--video",
            str(video),
            "--summary",
            str(agent_summary),
            "--metrics-port",
            "0",
            "--robot-id",
            "demo-gen3-sim",
        ],
        env=stack.env,
        stdout=sys.stdout,
        stderr=(out / "agent.log").open("wb"),
    )
    if agent.returncode != 0:
        say(f"agent failed ({agent.returncode}); see {out / 'agent.log'}")
        return agent.returncode

    summary = json.loads(agent_summary.read_text())
    url = f"{stack.http_url}/v1/episodes/{summary['episode_id']}"
    with urllib.request.urlopen(url, timeout=5) as r:
        summary["episode_record"] = json.loads(r.read())
    task = summary.get("task") or {}
    summary = {"success": bool(task.get("success")), "task_check": task, **summary}
    summary["store"] = "redis" if stack.redis_url else "memory"
    summary["checkpoint"] = str(checkpoint)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lat = summary["chunk_latency"]
    loop = summary["loop"]
    say(
        f"done: {summary['steps']} steps, chunk round trip p50 "
        f"{lat['round_trip_p50_s'] * 1e3:.1f} ms / p99 {lat['round_trip_p99_s'] * 1e3:.1f} ms, "
        f"loop period p99 {loop['period_p99_s'] * 1e3:.2f} ms, "
        f"{loop['deadline_misses']} deadline misses, "
        f"tool moved {summary['tool_displacement_m'] * 100:.1f} cm"
    )
    verdict = "SUCCESS" if summary["success"] else "not achieved"
    say(f"task {task.get('instruction')!r}: {verdict}")
    say(f"wrote {video} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
