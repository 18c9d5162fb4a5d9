"""gr2-curriculum on real demonstrations: one-block scenes keep only the target block,
swap-colours exchanges two blocks' colours and names, and a mix holds the first N touch
episodes of each source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gr2_training import curriculum, datagen
from gr2_training.dataset import EpisodeDataset


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("curriculum") / "data"
    argv = ["--tasks", "touch,push", "--episodes-per-task", "2", "--out", str(data), "--quiet"]
    assert datagen.main(argv) == 0
    return data


def colour_pixels(frame: np.ndarray) -> dict[str, int]:
    return {c: int(m.sum()) for c, m in curriculum.block_masks(frame).items()}


def test_one_block_paints_over_every_block_but_the_target(demos: Path, tmp_path: Path) -> None:
    out = tmp_path / "one"
    assert curriculum.main(["one-block", "--data", str(demos), "--out", str(out)]) == 0
    src, dst = EpisodeDataset(demos), EpisodeDataset(out)
    touch = src.select(task="touch")
    assert len(dst) == len(touch) == 2  # the push episodes are left out
    for i, j in zip(touch, range(len(dst)), strict=True):
        before, after = src.load(i), dst.load(j)
        colour = before.info.extra["task"]["colour"]
        assert after.info.instruction == before.info.instruction
        assert after.info.extra["curriculum"] == "one-block"
        np.testing.assert_array_equal(after.actions, before.actions)
        np.testing.assert_array_equal(after.states, before.states)
        first = before.images["head"][0]
        seen = colour_pixels(first)
        assert all(n > 0 for n in seen.values()), seen  # the head view shows all three
        left = colour_pixels(after.images["head"][0])
        assert left[colour] == seen[colour]
        assert all(n == 0 for c, n in left.items() if c != colour), left
        changed = np.any(after.images["head"][0] != first, axis=-1)
        # Only the other blocks (and their one-pixel rim) were painted.
        others = np.zeros_like(changed)
        for c, mask in curriculum.block_masks(first).items():
            if c != colour:
                others |= curriculum._grow(mask)
        assert changed.any() and not (changed & ~others).any()


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_swap_colours_exchanges_two_blocks_and_their_names(demos: Path, tmp_path: Path) -> None:
    out = tmp_path / "swapped"
    assert curriculum.main(["swap-colours", "--data", str(demos), "--out", str(out)]) == 0
    src, dst = EpisodeDataset(demos), EpisodeDataset(out)
    touch = src.select(task="touch")
    assert len(dst) == len(touch) == 2
    reference = curriculum.reference_colours(src)["head"]
    rename = {"green": "blue", "blue": "green", "red": "red"}
    for i, j in zip(touch, range(len(dst)), strict=True):
        before, after = src.load(i), dst.load(j)
        colour = before.info.extra["task"]["colour"]
        assert after.info.extra["task"]["colour"] == rename[colour]
        assert after.info.instruction == f"touch the {rename[colour]} block"
        assert after.info.extra["task"]["instruction"] == after.info.instruction
        assert after.info.extra["curriculum"] == "swap-green-blue"
        np.testing.assert_array_equal(after.actions, before.actions)
        np.testing.assert_array_equal(after.states, before.states)
        old = curriculum.block_masks(before.images["head"][0])
        new = curriculum.block_masks(after.images["head"][0])
        np.testing.assert_array_equal(new["red"], old["red"])  # red is left alone
        for a, b in (("green", "blue"), ("blue", "green")):
            # Block a's place now shows colour b: same spot, about the same size.
            assert abs(int(new[b].sum()) - int(old[a].sum())) <= 0.25 * old[a].sum()
            np.testing.assert_allclose(centroid(new[b]), centroid(old[a]), atol=1.0)
            mean = after.images["head"][0][new[b]].mean(axis=0)
            np.testing.assert_allclose(mean, reference[b], atol=30)
        changed = np.any(after.images["head"][0] != before.images["head"][0], axis=-1)
        near = curriculum._grow(old["green"]) | curriculum._grow(old["blue"])
        assert changed.any() and not (changed & ~near).any()  # nothing else was touched


def test_mix_takes_the_first_touch_episodes_of_each_source(
    demos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = tmp_path / "one"
    assert curriculum.main(["one-block", "--data", str(demos), "--out", str(one)]) == 0
    out = tmp_path / "mixed"
    assert curriculum.main(["mix", "--out", str(out), "--take", "1", str(one), str(demos)]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert list(report["episodes"].values()) == [1, 1]
    uneven = ["mix", "--out", str(tmp_path / "uneven"), "--take", "1", "--take", "2"]
    assert curriculum.main([*uneven, str(one), str(demos)]) == 0
    assert len(EpisodeDataset(tmp_path / "uneven")) == 3
    mixed = EpisodeDataset(out)
    assert [mixed.index[i].task for i in range(len(mixed))] == ["touch", "touch"]
    assert mixed.load(0).info.extra.get("curriculum") == "one-block"
    assert "curriculum" not in mixed.load(1).info.extra
    np.testing.assert_array_equal(
        mixed.load(1).images["head"], EpisodeDataset(demos).load(0).images["head"]
    )


def test_curriculum_refuses_to_overwrite_and_bad_sources(
    demos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert curriculum.main(["mix", "--out", str(tmp_path / "m"), "--take", "1", str(demos)]) == 0
    assert curriculum.main(["mix", "--out", str(tmp_path / "m"), "--take", "1", str(demos)]) == 2
    assert "is not empty" in capsys.readouterr().err
    two = ["mix", "--out", str(tmp_path / "n"), "--take", "1", "--take", "2", str(demos)]
    assert curriculum.main(two) == 2
    assert "2 --take counts for 1 sources" in capsys.readouterr().err
    assert curriculum.main(["one-block", "--data", str(demos), "--out", str(tmp_path / "m")]) == 2
    assert "already holds" in capsys.readouterr().err
    same = ["swap-colours", "--data", str(demos), "--out", str(tmp_path / "s"), "--pair", "red"]
    assert curriculum.main([*same, "red"]) == 2
    assert "two different block colours" in capsys.readouterr().err
    bad = ["one-block", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]
    assert curriculum.main(bad) == 2
    assert "not a dataset" in capsys.readouterr().err
