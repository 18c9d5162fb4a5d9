"""Does a trained policy follow the instruction? A grounding probe on touch demonstrations.

For each touch episode of a dataset, at steps 0 and 4, the policy predicts its chunk three
times: once per block colour named in the instruction. It prints JSON:

- ``error_to_expert_m``: the predicted last waypoint's distance (x, y) from the expert's, for
  the true instruction;
- ``colour_consistency``: how often the waypoint predicted for colour c is nearest block c
  (1/3 = chance: the instruction is ignored);
- ``spread_across_colours_m``: how far apart the three predictions are;
- ``consistency_per_colour``: ``colour_consistency`` split by the colour named (which
  instruction the policy follows and which it does not).

    python -m gr2_training.probe --checkpoint runs/demo/ft/checkpoint --data data/sim \\
        --episodes 40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from gr2_policy.model.checkpoint import load_checkpoint
from gr2_policy.model.policy import GR2Policy
from gr2_wbc.robots.sim import scene

from gr2_training.dataset import Episode, EpisodeDataset

PROBE_STEPS = (0, 4)


@torch.no_grad()
def probe_step(policy: GR2Policy, episode: Episode, t: int) -> tuple[float, dict[str, bool], float]:
    """(error to the expert [m], per colour whether its prediction is nearest its block,
    largest distance between the per-colour predictions [m]) at step ``t``."""
    colours = list(scene.BLOCK_COLOURS)
    named = next(c for c in colours if f" {c} " in f" {episode.info.instruction} ")
    views = policy.config.views
    images = np.stack([episode.images[v][: t + 1] for v in views], axis=1)
    ids = policy.tokenize_images(torch.from_numpy(images)[None])
    states = torch.from_numpy(episode.states[: t + 1]).float()[None]
    ends = {}
    for colour in colours:
        lang = policy.encode_instruction([episode.info.instruction.replace(named, colour)])
        ends[colour] = policy.predict_actions(lang, ids, states).positions[0, -1, :2].numpy()
    blocks = {c: np.asarray(xyy[:2]) for c, xyy in scene.block_layout(episode.info.seed).items()}
    error = float(np.linalg.norm(ends[named] - episode.actions[t, -1, :2]))
    hits = {
        c: min(blocks, key=lambda b, c=c: np.linalg.norm(ends[c] - blocks[b])) == c for c in colours
    }
    spread = max(float(np.linalg.norm(ends[a] - ends[b])) for a in colours for b in colours)
    return error, hits, spread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gr2_training.probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a gr2-datagen dataset")
    parser.add_argument("--episodes", type=int, default=40, help="touch episodes to probe")
    args = parser.parse_args(argv)
    policy = load_checkpoint(args.checkpoint).eval()
    dataset = EpisodeDataset(args.data)
    chosen = dataset.select(task="touch")[: args.episodes]
    if not chosen:
        parser.error(f"{args.data} has no touch episodes")
    report: dict[str, object] = {"checkpoint": str(args.checkpoint), "episodes": len(chosen)}
    rows: dict[int, list[tuple[float, dict[str, bool], float]]] = {t: [] for t in PROBE_STEPS}
    for i in chosen:
        episode = dataset.load(i)
        for t in PROBE_STEPS:
            if t < episode.steps:
                rows[t].append(probe_step(policy, episode, t))
    for t, values in rows.items():
        hits = np.array([[h[c] for c in scene.BLOCK_COLOURS] for _, h, _ in values], dtype=float)
        report[f"step_{t}"] = {
            "error_to_expert_m": round(float(np.mean([v[0] for v in values])), 4),
            "colour_consistency": round(float(hits.mean()), 3),
            "spread_across_colours_m": round(float(np.mean([v[2] for v in values])), 4),
            "consistency_per_colour": {
                c: round(float(hits[:, i].mean()), 3) for i, c in enumerate(scene.BLOCK_COLOURS)
            },
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
