"""Render the sample scenes shipped with the policy server (web page, CLI examples, tests).

Each sample is one scene of the MuJoCo Gen3 sim (a held-out evaluation seed) with the arm at
home: one PNG per camera view at the served size, plus an instruction for it, listed in
``samples.json``. Re-run after changing the scene or the served image size:

    MUJOCO_GL=egl .venv/bin/python scripts/render_samples.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gr2_wbc.robots.sim.backend import MujocoGen3
from gr2_wbc.tasks import eval_seeds, sample_task
from PIL import Image

OUT = (
    Path(__file__).resolve().parents[1] / "services/policy_server/src/gr2_policy/api/static/samples"
)
SAMPLES = (("touch", 0), ("pick", 1), ("push", 2))  # (task, index into the eval seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (64)")
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    args = parser.parse_args()
    index = []
    seeds = eval_seeds(len(SAMPLES))
    for task, i in SAMPLES:
        instance = sample_task(task, seeds[i])
        name = f"{task}-{instance.seed}"
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        with MujocoGen3(seed=instance.seed) as sim:
            views = sim.render_cameras(args.size, args.size)
        files = {}
        for view, rgb in views.items():
            Image.fromarray(rgb).save(folder / f"{view}.png", optimize=True)
            files[view] = f"{name}/{view}.png"
        index.append({"name": name, "instruction": instance.instruction, "views": files})
        print(f"{name}: {instance.instruction}")
    (args.out / "samples.json").write_text(json.dumps({"samples": index}, indent=2) + "\n")


if __name__ == "__main__":
    main()
