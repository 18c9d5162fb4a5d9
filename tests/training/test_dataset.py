"""The episode dataset round-trips, continues, and refuses what does not fit its format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gr2_training.dataset import DatasetError, DatasetMeta, DatasetWriter, EpisodeDataset

META = DatasetMeta(
    views=("head", "wrist"), image_size=16, step_period_s=0.2, action_horizon=3, waypoint_dt_s=0.1
)


def fake_episode(steps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "instruction": f"touch the red block ({seed})",
        "task": "touch",
        "seed": seed,
        "success": seed % 2 == 0,
        "images": {v: rng.integers(0, 256, (steps, 16, 16, 3), np.uint8) for v in META.views},
        "states": rng.normal(size=(steps, 8)),
        "actions": rng.normal(size=(steps, 3, 8)),
        "action_valid": rng.random((steps, 3)) > 0.2,
        "times": 0.2 * np.arange(steps),
        "joint_positions": rng.normal(size=(steps, 7)),
    }


def test_episodes_round_trip_and_stream(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path, META)
    sources = [fake_episode(5 + i, seed=i) for i in range(3)]
    for ep in sources:
        writer.add(**ep)
    data = EpisodeDataset(tmp_path)
    assert data.meta == META and len(data) == 3
    for ep, src in zip(data, sources, strict=True):
        assert ep.info.instruction == src["instruction"] and ep.steps == src["states"].shape[0]
        for view in META.views:
            np.testing.assert_array_equal(ep.images[view], src["images"][view])
        np.testing.assert_allclose(ep.states, src["states"], rtol=1e-6)  # stored float32
        np.testing.assert_allclose(ep.actions, src["actions"], rtol=1e-6)
        np.testing.assert_array_equal(ep.action_valid, src["action_valid"])
        np.testing.assert_array_equal(ep.times, src["times"])
    assert data.select(success=True) == [0, 2] and data.select(task="touch") == [0, 1, 2]
    # Each file is self-contained: its info travels with it.
    with np.load(tmp_path / data.index[1].file) as raw:
        assert json.loads(str(raw["info"]))["seed"] == 1


def test_a_writer_continues_an_existing_dataset_with_the_same_meta(tmp_path: Path) -> None:
    DatasetWriter(tmp_path, META).add(**fake_episode(4, 0))
    writer = DatasetWriter(tmp_path, META)
    assert writer.count == 1
    writer.add(**fake_episode(4, 1))
    assert [i.file for i in EpisodeDataset(tmp_path).index] == [
        "episodes/000000.npz",
        "episodes/000001.npz",
    ]
    other = DatasetMeta(("head",), 16, 0.2, 3, 0.1)
    with pytest.raises(DatasetError, match="holds"):
        DatasetWriter(tmp_path, other)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e["images"].pop("wrist"), "views"),
        (lambda e: e.update(states=e["states"][:, :7]), "states"),
        (lambda e: e.update(actions=e["actions"][:, :2]), "actions"),
        (lambda e: e["states"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda e: e["images"].update(head=e["images"]["head"][:, :8]), "image_head"),
    ],
    ids=["missing view", "state dim", "horizon", "nan", "image size"],
)
def test_bad_episodes_are_refused_and_nothing_is_written(tmp_path: Path, change, message) -> None:
    writer = DatasetWriter(tmp_path, META)
    ep = fake_episode(4, 0)
    change(ep)
    with pytest.raises(DatasetError, match=message):
        writer.add(**ep)
    assert len(EpisodeDataset(tmp_path)) == 0
    assert list((tmp_path / "episodes").iterdir()) == []


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no dataset\.json"):
        EpisodeDataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(DatasetError, match="not a gr2-episodes"):
        EpisodeDataset(tmp_path)
