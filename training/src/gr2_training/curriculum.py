"""`gr2-curriculum`: derived datasets for a curriculum against the step-0 saddle.

A small policy trained from scratch on three-block touch scenes first learns the mean
waypoint, and the gradient that would teach it where the blocks are fades with that (README,
"The demo model"). Scenes with one block make the block's position the target, a direct
correlation it learns within a few hundred steps; mixing those scenes with real ones keeps
that skill while the policy learns which block the instruction names.

::

    gr2-curriculum one-block --data data/sim --out data/one_block   # touch episodes, 1 block
    gr2-curriculum mix --out data/mixed --take 700 data/one_block data/sim
    gr2-curriculum mix --out data/mostly_real --take 350 --take 1500 data/one_block data/sim
    gr2-curriculum swap-colours --data data/sim --out data/swapped   # green <-> blue

``one-block`` copies the touch episodes of a dataset with every block but the target painted
over in the table's colour, in every frame of every view (the actions, states and instruction
are unchanged: the expert went to that block anyway). ``swap-colours`` copies the touch
episodes with two blocks trading colours in every frame and the instruction renamed to match,
so that the same layout and the same motion come with the other colour's name: a pair that
only the colour word tells apart (the demo model confuses green with blue). The blocks are found
by colour: the sim's palette (``gr2_wbc.robots.sim.scene.BLOCK_COLOURS``) is saturated red,
green and blue on a grey table and grey arm, and the thresholds below were checked on both
views' frames. ``mix`` makes a dataset of the first N touch episodes of each source (``--take``
once, or once per source; files copied: episodes are ~20 kB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from gr2_wbc.robots.sim import scene

from gr2_training.dataset import DatasetError, DatasetWriter, EpisodeDataset

# The table as the head and wrist cameras see it under the scene's lights (RGB).
TABLE_RGB = np.array([217, 210, 196], dtype=np.uint8)
COLOURS = tuple(scene.BLOCK_COLOURS)


def block_masks(image: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 image (H, W, 3) -> colour name -> bool mask (H, W) of that block's pixels."""
    r, g, b = (image[..., i].astype(np.int32) for i in range(3))
    return {
        "red": (r > 100) & (r > 1.6 * g) & (r > 1.6 * b),
        "green": (g > 90) & (g > 1.4 * r) & (g > 1.4 * b),
        "blue": (b > 90) & (b > 1.4 * r) & (b > 1.2 * g),
    }


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 4-neighbours: takes the anti-aliased edge of a block too."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def keep_only_block(frames: np.ndarray, colour: str) -> np.ndarray:
    """frames (T, H, W, 3) uint8 -> a copy with every block but ``colour`` painted over."""
    out = frames.copy()
    for frame in out:
        for name, mask in block_masks(frame).items():
            if name != colour:
                frame[_grow(mask)] = TABLE_RGB
    return out


def one_block(src: str | Path, dst: str | Path) -> int:
    """Write the touch episodes of ``src`` to ``dst`` with only the target block left.
    Returns the number of episodes written."""
    dataset = EpisodeDataset(src)
    writer = DatasetWriter(dst, dataset.meta)
    if writer.count:
        raise DatasetError(f"{dst} already holds {writer.count} episodes: give a new --out")
    for i in dataset.select(task="touch"):
        episode = dataset.load(i)
        colour = episode.info.extra.get("task", {}).get("colour")
        if colour not in COLOURS:
            raise DatasetError(f"{episode.info.file}: no target colour in its task record")
        writer.add(
            instruction=episode.info.instruction,
            task=episode.info.task,
            seed=episode.info.seed,
            success=episode.info.success,
            images={v: keep_only_block(f, colour) for v, f in episode.images.items()},
            states=episode.states,
            actions=episode.actions,
            action_valid=episode.action_valid,
            times=episode.times,
            joint_positions=episode.joint_positions,
            extra={**episode.info.extra, "curriculum": "one-block"},
        )
    return writer.count


def reference_colours(
    dataset: EpisodeDataset, episodes: int = 20
) -> dict[str, dict[str, np.ndarray]]:
    """view -> colour -> mean RGB (float) of that block's pixels over the first frames of the
    first ``episodes`` touch episodes: what the renderer makes of each block in each view."""
    sums = {v: {c: np.zeros(3) for c in COLOURS} for v in dataset.meta.views}
    counts = {v: dict.fromkeys(COLOURS, 0) for v in dataset.meta.views}
    for i in dataset.select(task="touch")[:episodes]:
        for view, frames in dataset.load(i).images.items():
            for colour, mask in block_masks(frames[0]).items():
                sums[view][colour] += frames[0][mask].sum(axis=0)
                counts[view][colour] += int(mask.sum())
    for view, per_colour in counts.items():
        missing = [c for c, n in per_colour.items() if n == 0]
        if missing:
            raise DatasetError(
                f"no {'/'.join(missing)} block pixels in the {view} view's first frames"
            )
    return {v: {c: sums[v][c] / counts[v][c] for c in sums[v]} for v in sums}


def swap_block_colours(
    frames: np.ndarray, a: str, b: str, reference: dict[str, np.ndarray]
) -> np.ndarray:
    """frames (T, H, W, 3) uint8 -> a copy in which blocks ``a`` and ``b`` trade colours.

    A block's pixels take the other's dominant channel in place of their own, scaled so that
    ``reference[a]`` (mean RGB) becomes ``reference[b]`` and back: shading is kept. The
    anti-aliased rim (table blended with block) moves by the blend's share of the difference
    between the two colours, so the edge stays an edge of the new colour.
    """
    ref = {c: np.asarray(reference[c], np.float64) for c in (a, b)}
    perm = np.arange(3)
    ia, ib = int(np.argmax(ref[a])), int(np.argmax(ref[b]))
    perm[ia], perm[ib] = ib, ia
    out = frames.copy()
    table = TABLE_RGB.astype(np.float64)
    for frame, src_frame in zip(out, frames, strict=True):
        masks = block_masks(src_frame)
        blocks = np.zeros(src_frame.shape[:2], bool)
        for mask in masks.values():
            blocks |= mask
        pixels = src_frame.astype(np.float64)
        for src, dst in ((a, b), (b, a)):
            core = masks[src]
            gain = ref[dst] / np.maximum(ref[src][perm], 1.0)
            frame[core] = np.clip(pixels[core][:, perm] * gain + 0.5, 0, 255).astype(np.uint8)
            rim = _grow(core) & ~blocks
            direction = ref[src] - table
            share = np.clip((pixels[rim] - table) @ direction / (direction @ direction), 0, 1)
            moved = pixels[rim] + share[:, None] * (ref[dst] - ref[src])
            frame[rim] = np.clip(moved + 0.5, 0, 255).astype(np.uint8)
    return out


def swap_colours(src: str | Path, dst: str | Path, a: str = "green", b: str = "blue") -> int:
    """Write every touch episode of ``src`` to ``dst`` with blocks ``a`` and ``b`` trading
    colours in every frame, and the instruction renamed to match (a touch of the ``a`` block
    becomes a touch of the ``b`` block standing where it stood). Returns episodes written."""
    if {a, b} - set(COLOURS) or a == b:
        raise DatasetError(f"--pair needs two different block colours, not {a!r} and {b!r}")
    dataset = EpisodeDataset(src)
    writer = DatasetWriter(dst, dataset.meta)
    if writer.count:
        raise DatasetError(f"{dst} already holds {writer.count} episodes: give a new --out")
    reference = reference_colours(dataset)
    rename = {a: b, b: a}
    for i in dataset.select(task="touch"):
        episode = dataset.load(i)
        task_record = dict(episode.info.extra.get("task", {}))
        colour = task_record.get("colour")
        if colour not in COLOURS:
            raise DatasetError(f"{episode.info.file}: no target colour in its task record")
        new_colour = rename.get(colour, colour)
        instruction = episode.info.instruction.replace(f" {colour} ", f" {new_colour} ")
        if new_colour != colour and instruction == episode.info.instruction:
            raise DatasetError(f"{episode.info.file}: {colour!r} not in {instruction!r}")
        task_record.update(colour=new_colour, instruction=instruction)
        writer.add(
            instruction=instruction,
            task=episode.info.task,
            seed=episode.info.seed,
            success=episode.info.success,
            images={
                v: swap_block_colours(f, a, b, reference[v]) for v, f in episode.images.items()
            },
            states=episode.states,
            actions=episode.actions,
            action_valid=episode.action_valid,
            times=episode.times,
            joint_positions=episode.joint_positions,
            extra={**episode.info.extra, "task": task_record, "curriculum": f"swap-{a}-{b}"},
        )
    return writer.count


def mix(dst: str | Path, take: Sequence[int], sources: Sequence[str | Path]) -> list[int]:
    """A dataset of the first ``take[k]`` touch episodes of source k, in source order.
    Returns how many each source gave."""
    if len(take) != len(sources):
        raise DatasetError(f"{len(take)} --take counts for {len(sources)} sources")
    out = Path(dst)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} is not empty: give a new --out")
    datasets = [EpisodeDataset(s) for s in sources]
    for other, source in zip(datasets[1:], sources[1:], strict=True):
        if other.meta != datasets[0].meta:
            raise DatasetError(f"{source} does not match {sources[0]}: {other.meta}")
    DatasetWriter(out, datasets[0].meta)  # dataset.json
    lines, counts = [], []
    for k, (dataset, n) in enumerate(zip(datasets, take, strict=True)):
        chosen = dataset.select(task="touch")[:n]
        for i in chosen:
            info = dataset.index[i]
            name = f"episodes/{k}_{Path(info.file).name}"
            shutil.copyfile(dataset.root / info.file, out / name)
            lines.append(json.dumps({**asdict(info), "file": name}))
        counts.append(len(chosen))
    (out / "index.jsonl").write_text("".join(line + "\n" for line in lines))
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gr2-curriculum", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("one-block", help="touch episodes with only the target block left")
    p.add_argument("--data", required=True, help="source dataset")
    p.add_argument("--out", required=True, help="new dataset directory")
    p = sub.add_parser(
        "swap-colours", help="touch episodes with two blocks' colours (and names) exchanged"
    )
    p.add_argument("--data", required=True, help="source dataset")
    p.add_argument("--out", required=True, help="new dataset directory")
    p.add_argument(
        "--pair",
        nargs=2,
        default=["green", "blue"],
        metavar=("A", "B"),
        help="the two block colours to exchange (default: green blue)",
    )
    p = sub.add_parser("mix", help="the first N touch episodes of each source, in one dataset")
    p.add_argument("--out", required=True, help="new dataset directory")
    p.add_argument(
        "--take",
        type=int,
        action="append",
        required=True,
        help="touch episodes to take: once for every source, or once per source in order",
    )
    p.add_argument("sources", nargs="+", help="source datasets")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gr2-curriculum``; 0 on success, 2 on a dataset problem."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "one-block":
            written = one_block(args.data, args.out)
            print(json.dumps({"out": args.out, "episodes": written}))
        elif args.command == "swap-colours":
            written = swap_colours(args.data, args.out, *args.pair)
            print(json.dumps({"out": args.out, "episodes": written}))
        else:
            take = args.take * len(args.sources) if len(args.take) == 1 else args.take
            if min(take) < 1:
                raise DatasetError("--take must be >= 1")
            counts = mix(args.out, take, args.sources)
            print(
                json.dumps(
                    {"out": args.out, "episodes": dict(zip(args.sources, counts, strict=True))}
                )
            )
    except DatasetError as err:
        print(f"gr2-curriculum {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
