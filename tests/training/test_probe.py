"""The grounding probe runs on a real demonstration and reports what the README quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gr2_policy.model.checkpoint import init_random_policy, save_checkpoint
from gr2_training import datagen, probe
from gr2_wbc.robots.sim import scene


def test_probe_reports_grounding_at_steps_0_and_4(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    argv = ["--tasks", "touch,push", "--episodes-per-task", "1", "--out", str(data), "--quiet"]
    assert datagen.main(argv) == 0
    checkpoint = save_checkpoint(init_random_policy("gr2-tiny", 0), tmp_path / "ck")
    capsys.readouterr()
    assert probe.main(["--checkpoint", str(checkpoint), "--data", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["episodes"] == 1  # the touch episode only
    for step in ("step_0", "step_4"):
        row = report[step]
        # Three colours per episode: consistency is a whole number of thirds.
        assert round(row["colour_consistency"] * 3, 2) in (0, 1, 2, 3)
        # Random weights move ~1 cm from the current pose: far from the expert's waypoint.
        assert 0 < row["error_to_expert_m"] < 1.0
        assert row["spread_across_colours_m"] >= 0
        # One episode: each colour's prediction is on its own block or not.
        per_colour = row["consistency_per_colour"]
        assert sorted(per_colour) == sorted(scene.BLOCK_COLOURS)
        assert set(per_colour.values()) <= {0.0, 1.0}
        assert sum(per_colour.values()) / 3 == pytest.approx(row["colour_consistency"], abs=1e-3)


def test_probe_refuses_a_dataset_without_touch_episodes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    argv = ["--tasks", "push", "--episodes-per-task", "1", "--out", str(data), "--quiet"]
    assert datagen.main(argv) == 0
    checkpoint = save_checkpoint(init_random_policy("gr2-tiny", 0), tmp_path / "ck")
    with pytest.raises(SystemExit) as err:
        probe.main(["--checkpoint", str(checkpoint), "--data", str(data)])
    assert err.value.code == 2
