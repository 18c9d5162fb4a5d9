"""`gr2-datagen`: scripted-expert demonstrations of the sim tasks, written as a dataset.

    gr2-datagen --tasks touch,pick,push --episodes-per-task 200 --out data/sim
                [--seed-start 0] [--targets drawn|all] [--detour [KINDS]]
                [--keep-failures] [--workers 2] [--preset gr2-tiny]

For each task, seeds ``seed-start``, ``seed-start + 1``, ... are demonstrated by
:mod:`gr2_training.expert` until the dataset holds ``--episodes-per-task`` episodes of that
task from those seeds (or ``--max-attempts`` episodes were tried). Failed demonstrations are
not written unless ``--keep-failures`` (they are indexed with ``success: false`` then); they
are listed in ``DIR/expert_failures.jsonl`` either way.

``--targets``: ``drawn`` (default) demonstrates the seed's own instance (``Task.sample``), the
one evaluation uses for a held-out seed; ``all`` demonstrates every instance the seed's scene
allows (``Task.instances``: each block as the target). With ``all`` the dataset holds the same
first frame under different instructions, so a model cannot tell those episodes apart from the
images alone and has to ground the instruction.

``--detour [KINDS]``: recovery demonstrations. Each episode first takes the tool a wrong way
and then does the task from there; the steps before the detour is over carry no action
labels, so a model learns the way back (see :mod:`gr2_training.expert`). KINDS is a
comma-separated subset of ``overshoot`` (past the target), ``other_block`` (above another
block), ``anywhere`` (in the workspace), ``wrong_block`` (down onto another block and a pause
there) and ``toward_block`` (part of the way to another block); plain ``--detour`` means the
first three. Give them their own ``--out`` and
mix them with plain demonstrations (``gr2-curriculum mix``); they take longer, so raise
``--time-limit``.

Resumable: re-running the same command continues the dataset; (task, seed, instruction)
already in the index or in the failure list are skipped, so an interrupted run loses at most
the episodes in flight.
Training seeds only: every seed must be below ``gr2_wbc.tasks.EVAL_SEED_START`` (held-out
evaluation seeds start there).

The dataset metadata (views, image size, step period, action horizon k, waypoint spacing)
comes from the model preset (``--preset``, default ``gr2-tiny``) and the agent's loop
defaults, so the data matches what the served model consumes and predicts. The summary
(stdout, JSON) gives per task the episodes written, the expert's success rate, mean steps
and wall seconds per episode, and the dataset's size per episode.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from gr2_training.dataset import DatasetError, DatasetMeta, DatasetWriter, EpisodeDataset
from gr2_training.detours import DEFAULT_DETOURS, DETOUR_KINDS, check_detour_kinds

if TYPE_CHECKING:
    from gr2_wbc.tasks import TaskInstance

    from gr2_training.expert import EpisodeSpec, ExpertEpisode

FAILURES_FILE = "expert_failures.jsonl"
TARGETS = ("drawn", "all")
SOURCE = "scripted expert (gr2_training.expert) through the WBC agent's control loop in MuJoCo"


@dataclass
class TaskTally:
    """What one run did for one task."""

    wanted: int
    have: int = 0  # episodes of the task in the dataset from the run's seed range
    attempts: int = 0
    successes: int = 0
    written: int = 0
    steps: int = 0
    wall_s: float = 0.0
    next_seed: int = 0
    failed_seeds: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return max(self.wanted - self.have, 0)

    def summary(self) -> dict[str, Any]:
        n = max(self.attempts, 1)
        return {
            "episodes_in_dataset": self.have,
            "written": self.written,
            "attempts": self.attempts,
            "expert_successes": self.successes,
            "expert_success_rate": None if not self.attempts else self.successes / self.attempts,
            "mean_steps": None if not self.attempts else self.steps / n,
            "wall_s_per_episode": None if not self.attempts else self.wall_s / n,
            "failed_seeds": self.failed_seeds,
        }


def _demonstrate(
    job: tuple[TaskInstance, EpisodeSpec, float, tuple[str, ...]],
) -> ExpertEpisode:
    """Worker: one expert episode (module level so a process pool can pickle it)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from gr2_training.expert import run_expert

    instance, spec, max_seconds, detour = job
    return run_expert(instance, spec, max_seconds=max_seconds, detour=detour)


def _read_failures(root: Path) -> set[tuple[str, int, str]]:
    """(task, seed, instruction) of the failed demonstrations listed in ``root``."""
    path = root / FAILURES_FILE
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            out.add((entry["task"], int(entry["seed"]), entry["instruction"]))
    return out


def _dataset_mb_per_episode(root: Path, count: int) -> float | None:
    if not count:
        return None
    size = sum(p.stat().st_size for p in (root / "episodes").glob("*.npz"))
    return size / count / 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gr2-datagen",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tasks", default="touch,pick,push", help="comma-separated task names")
    parser.add_argument("--episodes-per-task", type=int, required=True, metavar="N")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset dir")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--targets",
        choices=TARGETS,
        default="drawn",
        help="per seed: the drawn instance only (default), or every block as the target",
    )
    parser.add_argument(
        "--detour",
        nargs="?",
        const=",".join(DEFAULT_DETOURS),
        default="",
        metavar="KINDS",
        help="recovery demonstrations: a wrong way first, labelled only on the way back; "
        f"KINDS of {', '.join(DETOUR_KINDS)} (default {','.join(DEFAULT_DETOURS)})",
    )
    parser.add_argument(
        "--keep-failures", action="store_true", help="also write failed demonstrations"
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help="episodes tried per task at most (default 2 N + 10)",
    )
    parser.add_argument(
        "--time-limit", type=float, default=15.0, help="robot seconds per episode (default 15)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="expert processes (default 1; one per core)"
    )
    parser.add_argument(
        "--preset", default="gr2-tiny", help="model preset whose I/O the data matches"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _key(instance: TaskInstance) -> tuple[str, int, str]:
    return instance.name, instance.seed, instance.instruction


def _jobs(
    tallies: dict[str, TaskTally],
    done: set[tuple[str, int, str]],
    limit: int,
    end_seed: int,
    targets: str,
) -> list[TaskInstance]:
    """The next round: per task as many untried instances as it still needs, seed by seed
    (all of a seed's instances with ``targets == "all"``)."""
    from gr2_wbc.tasks import get_task

    out: list[TaskInstance] = []
    for name, tally in tallies.items():
        task, need, queued = get_task(name), tally.remaining, 0
        while need > 0 and tally.attempts + queued < limit and tally.next_seed < end_seed:
            seed = tally.next_seed
            tally.next_seed += 1
            candidates = task.instances(seed) if targets == "all" else [task.sample(seed)]
            for instance in candidates:
                if need > 0 and tally.attempts + queued < limit and _key(instance) not in done:
                    out.append(instance)
                    need -= 1
                    queued += 1
    out.sort(key=lambda i: (i.seed, list(tallies).index(i.name)))  # seed-major: tasks interleave
    return out


def _run_round(
    pool: Executor | None,
    jobs: list[TaskInstance],
    spec: EpisodeSpec,
    limit_s: float,
    detour: tuple[str, ...],
) -> Iterator[tuple[TaskInstance, ExpertEpisode]]:
    payload = [(instance, spec, limit_s, detour) for instance in jobs]
    results = pool.map(_demonstrate, payload) if pool else map(_demonstrate, payload)
    yield from zip(jobs, results, strict=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    from gr2_wbc.tasks import EVAL_SEED_START, TASKS

    from gr2_training.expert import EpisodeSpec

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    if args.episodes_per_task < 1 or args.workers < 1 or args.time_limit <= 0:
        raise SystemExit("--episodes-per-task and --workers must be >= 1, --time-limit > 0")
    if not 0 <= args.seed_start < EVAL_SEED_START:
        raise SystemExit(
            f"--seed-start must be in [0, {EVAL_SEED_START}): seeds from {EVAL_SEED_START} on "
            "are held out for evaluation"
        )
    detour = tuple(k.strip() for k in args.detour.split(",") if k.strip())
    if detour:
        try:
            check_detour_kinds(detour)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    n = args.episodes_per_task
    limit = args.max_attempts if args.max_attempts is not None else 2 * n + 10
    spec = EpisodeSpec.from_model_config(args.preset)
    meta = DatasetMeta(
        views=spec.views,
        image_size=spec.image_size,
        step_period_s=spec.step_period_s,
        action_horizon=spec.action_horizon,
        waypoint_dt_s=spec.waypoint_dt_s,
        source=SOURCE,
    )
    try:
        writer = DatasetWriter(args.out, meta)
        existing = EpisodeDataset(args.out).index
    except DatasetError as err:
        raise SystemExit(f"gr2-datagen: {err}") from None
    failures = _read_failures(args.out)
    done = {(e.task, e.seed, e.instruction) for e in existing} | failures
    tallies = {t: TaskTally(wanted=n, next_seed=args.seed_start) for t in tasks}
    for e in existing:
        if e.task in tallies and e.seed >= args.seed_start:
            tallies[e.task].have += 1
    total = sum(t.remaining for t in tallies.values())
    print(
        f"[gr2-datagen] {args.out}: {len(existing)} episodes already, {total} to write "
        f"({', '.join(tasks)}; seeds from {args.seed_start}, targets: {args.targets}"
        f"{', detours: ' + ','.join(detour) if detour else ''})",
        file=sys.stderr,
        flush=True,
    )
    bar = tqdm(total=total, unit="ep", disable=args.quiet, file=sys.stderr)
    wall0 = time.perf_counter()
    # spawn, not fork: the workers start clean (no torch heap, no threads of this process).
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(args.workers, mp_context=spawn) if args.workers > 1 else None
    try:
        while True:
            jobs = _jobs(tallies, done, limit, EVAL_SEED_START, args.targets)
            if not jobs:
                break
            for instance, episode in _run_round(pool, jobs, spec, args.time_limit, detour):
                task, seed = instance.name, instance.seed
                tally = tallies[task]
                tally.attempts += 1
                tally.steps += episode.steps
                tally.wall_s += float(episode.extra["wall_s"])
                done.add(_key(instance))
                if episode.success:
                    tally.successes += 1
                else:
                    tally.failed_seeds.append(seed)
                    with (args.out / FAILURES_FILE).open("a") as f:
                        entry = {
                            "task": task,
                            "seed": seed,
                            "instruction": episode.instance.instruction,
                            "task_check": episode.extra["task"],
                        }
                        f.write(json.dumps(entry) + "\n")
                if episode.success or args.keep_failures:
                    writer.add(**episode.as_dataset_kwargs())
                    tally.written += 1
                    tally.have += 1
                    bar.update(1)
                bar.set_postfix(task=task, seed=seed, ok=episode.success)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    count = len(EpisodeDataset(args.out))
    summary = {
        "out": str(args.out),
        "episodes": count,
        "written": sum(t.written for t in tallies.values()),
        "seconds": round(time.perf_counter() - wall0, 2),
        "dataset_mb_per_episode": _dataset_mb_per_episode(args.out, count),
        "tasks": {task: tally.summary() for task, tally in tallies.items()},
    }
    print(json.dumps(summary, indent=2))
    short = [t for t, tally in tallies.items() if tally.have < tally.wanted]
    if short:
        print(
            f"[gr2-datagen] fewer than {n} episodes for {short} after {limit} attempts",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
