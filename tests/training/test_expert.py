"""The scripted expert solves every task through the real sim + control loop, and its
demonstrations round-trip through `gr2-datagen` and the dataset reader."""

from __future__ import annotations

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
from gr2_policy.model.config import GR2Config
from gr2_training import datagen
from gr2_training.dataset import EpisodeDataset
from gr2_training.detours import DEFAULT_DETOURS, DETOUR_KINDS, draw_detour
from gr2_training.expert import (
    CartesianPlan,
    EpisodeSpec,
    Keyframe,
    demonstrate,
    grasp_yaw,
    run_expert,
)
from gr2_wbc.kinematics.rotations import quat_to_matrix, rot_z, rotation_error
from gr2_wbc.robots.sim.backend import MujocoGen3
from gr2_wbc.tasks import EVAL_SEED_START, get_task

SEEDS = (0, 1, 2)


def test_spec_is_the_served_models() -> None:
    spec = EpisodeSpec.from_model_config("gr2-tiny")
    cfg = GR2Config.from_preset("gr2-tiny")
    assert spec.views == cfg.views == ("head", "wrist")
    assert (spec.image_size, spec.action_horizon, spec.waypoint_dt_s) == (64, 10, 0.1)
    assert spec.step_period_s == 0.2 and spec == EpisodeSpec()


def test_plan_is_min_jerk_through_the_keyframes() -> None:
    start = np.array([0.5, 0.0, 0.2])
    quat = np.array([0.0, 0.0, 1.0, 0.0])  # tool pointing down (x flipped)
    keys = [
        Keyframe(1.0, np.array([0.5, 0.1, 0.1]), 0.3, 0.0),
        Keyframe(0.5, np.array([0.5, 0.1, 0.1]), 0.3, 1.0),
    ]
    plan = CartesianPlan(2.0, start, quat, keys)
    assert plan.end_time_s == pytest.approx(3.5)
    pos, quats, grip = plan.sample(np.array([1.0, 2.0, 2.5, 3.0, 3.2, 9.0]))
    np.testing.assert_allclose(pos[0], start)  # before the start: at rest at the start
    np.testing.assert_allclose(pos[2], (start + keys[0].position) / 2)  # min-jerk midpoint
    np.testing.assert_allclose(pos[3], keys[0].position)
    np.testing.assert_allclose(pos[5], keys[1].position)
    np.testing.assert_allclose(grip, [0, 0, 0, 0, 1, 1])  # a keyframe's gripper leads to it
    turned = quat_to_matrix(quats[5])
    expected = rot_z(0.3) @ quat_to_matrix(quat)
    assert np.linalg.norm(rotation_error(expected, turned)) < 1e-9
    assert quat_to_matrix(quats[5])[2, 2] == pytest.approx(-1.0)  # still pointing down


def test_grasp_yaw_lines_the_fingers_up_with_a_face() -> None:
    down = np.diag([-1.0, 1.0, -1.0])  # HOME_Q's tool: finger axis (tool y) = base y
    for block_yaw in np.linspace(-np.pi, np.pi, 37):
        pose = np.eye(4)
        pose[:3, :3] = rot_z(block_yaw)
        yaw = grasp_yaw(pose, down)
        assert abs(yaw) <= np.pi / 4 + 1e-9
        finger = (rot_z(yaw) @ down)[:, 1]
        # the finger axis is parallel to one of the block's face normals
        assert max(abs(finger @ pose[:3, 0]), abs(finger @ pose[:3, 1])) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("task", ["touch", "pick", "push"])
def test_expert_solves_the_task(task: str, seed: int) -> None:
    episode = demonstrate(task, seed)
    check = episode.extra["task"]
    assert episode.success, check
    assert check["success"] and check["final"]["success"]
    assert episode.extra["watchdog_trips"] == 0 and episode.extra["qp_failures"] == 0
    spec = EpisodeSpec()
    t, k = episode.steps, spec.action_horizon
    assert 8 <= t <= 60
    for view in spec.views:
        assert episode.images[view].shape == (t, 64, 64, 3)
        assert episode.images[view].dtype == np.uint8
    assert episode.states.shape == (t, 8) and episode.actions.shape == (t, k, 8)
    assert episode.action_valid.shape == (t, k) and episode.action_valid.all()
    np.testing.assert_allclose(np.diff(episode.times), spec.step_period_s, atol=1e-6)
    # The episode ends a settle after success.
    end = episode.times[-1] - episode.times[0]
    assert check["success_time_s"] <= end <= check["success_time_s"] + 0.5 + 1e-6
    if task == "pick":  # the gripper closed on the block: stopped short of fully closed
        assert 0.4 < episode.states[-1, 7] < 0.8
        assert episode.actions[-1, :, 7].min() == 1.0
    else:
        assert episode.actions[:, :, 7].max() == (1.0 if task == "push" else 0.0)


def test_actions_are_the_tool_pose_after_each_step() -> None:
    """Waypoint j of step t is the tool pose (t + j * 0.1 s): waypoint 2 is exactly the next
    step's state, waypoint 1 lies between the two steps."""
    episode = demonstrate("pick", 4)
    s, a = episode.states, episode.actions
    np.testing.assert_allclose(a[:-1, 1, :3], s[1:, :3], atol=1e-6)
    np.testing.assert_allclose(a[:-2, 3, :3], s[2:, :3], atol=1e-6)
    for t in range(episode.steps - 1):
        lo = np.minimum(s[t, :3], s[t + 1, :3]) - 2e-3
        hi = np.maximum(s[t, :3], s[t + 1, :3]) + 2e-3
        assert np.all((lo <= a[t, 0, :3]) & (a[t, 0, :3] <= hi)), t
        same = abs(float(a[t, 1, 3:7] @ s[t + 1, 3:7]))
        assert same == pytest.approx(1.0, abs=1e-5)  # same orientation (up to sign)
    # The arm moves: a clear difference between the first waypoint and the state.
    assert np.abs(a[:, 0, :3] - s[:, :3]).max() > 0.01
    # The expert varies per seed.
    other = demonstrate("pick", 5)
    assert episode.extra["expert"] != other.extra["expert"]


@pytest.mark.parametrize("task", ["touch", "pick", "push"])
def test_detour_demonstration_goes_astray_then_solves_the_task(task: str) -> None:
    """A recovery demonstration visits its detour point, is unlabelled until it gets there,
    and then solves the task with every remaining step labelled."""
    instance = get_task(task).sample(3)
    episode = run_expert(instance, max_seconds=25.0, detour=DEFAULT_DETOURS)
    assert episode.success, episode.extra["task"]
    assert episode.extra["watchdog_trips"] == 0 and episode.extra["qp_failures"] == 0
    detour = episode.extra["detour"]
    assert detour["kind"] in DETOUR_KINDS
    labelled = episode.action_valid.any(axis=1)
    first = int(np.argmax(labelled))
    assert first > 0 and labelled[first:].all() and not labelled[:first].any()
    since_start = episode.times - episode.times[0]
    assert since_start[first] >= detour["end_s"] - 1e-6 > since_start[first - 1]
    # The tool got to the detour point (within tracking error and the 0.2 s between
    # observations), which is off the way the plain demonstration takes.
    to_detour = np.linalg.norm(episode.states[:, :3] - detour["position"], axis=1)
    assert to_detour.min() < 0.04
    plain = demonstrate(task, 3)
    assert np.linalg.norm(plain.states[:, :3] - detour["position"], axis=1).min() > 0.1
    assert episode.steps > plain.steps


def test_wrong_block_detour_comes_down_on_another_block_then_touches_the_target() -> None:
    instance = get_task("touch").sample(5)
    episode = run_expert(instance, max_seconds=25.0, detour=("wrong_block",))
    assert episode.success, episode.extra["task"]
    detour = episode.extra["detour"]
    assert detour["kind"] == "wrong_block" and 0.2 <= detour["hold_s"] <= 1.0
    sim = MujocoGen3(seed=5)
    try:
        blocks = {c: sim.block_pose(c)[:3, 3] for c in ("red", "green", "blue")}
    finally:
        sim.close()
    # The last unlabelled step is at the other block, low: as if touching it.
    last_astray = episode.states[int(np.argmax(episode.action_valid.any(axis=1))) - 1, :3]
    nearest = min(blocks, key=lambda c: np.linalg.norm(blocks[c][:2] - last_astray[:2]))
    assert nearest != instance.colour
    assert np.linalg.norm(blocks[nearest][:2] - last_astray[:2]) < 0.03
    assert last_astray[2] < blocks[nearest][2] + 0.02 + 0.02  # centre + half size + clearance
    # ... and the episode ends on the target.
    assert np.linalg.norm(blocks[instance.colour][:2] - episode.states[-1, :2]) < 0.02


def test_detours_cover_every_kind_inside_the_workspace() -> None:
    instance = get_task("touch").sample(0)
    sim = MujocoGen3(seed=0)
    try:
        target = sim.block_pose(instance.colour)[:3, 3]
        others = [
            sim.block_pose(c)[:3, 3] for c in ("red", "green", "blue") if c != instance.colour
        ]
        start = sim.read_state().ee_position
        rng = np.random.default_rng(0)
        detours = [draw_detour(instance, sim, rng, DETOUR_KINDS) for _ in range(200)]
        with pytest.raises(ValueError, match="unknown detour kind"):
            draw_detour(instance, sim, rng, ("sideways",))
    finally:
        sim.close()
    assert {d.kind for d in detours} == set(DETOUR_KINDS)
    points = np.concatenate([d.waypoints for d in detours])
    assert points[:, 0].min() >= 0.12 and points[:, 0].max() <= 0.88
    assert np.abs(points[:, 1]).max() <= 0.58
    for d in detours:
        if d.kind == "wrong_block":  # above the block, then down on it, then a pause
            assert d.waypoints[0, 2] > target[2] + 0.06 and d.waypoints[1, 2] < target[2] + 0.04
            assert d.hold_s > 0 and np.linalg.norm(d.position[:2] - target[:2]) > 0.05
        else:  # high enough to pass over every block
            assert len(d.waypoints) == 1 and d.position[2] > target[2] + 0.06
        if d.kind == "overshoot":  # beyond the target, seen from the start
            heading = target[:2] - start[:2]
            assert (d.position[:2] - target[:2]) @ heading > 0
        if d.kind == "toward_block":  # 30-80 % of the way from the start to another block
            fractions = [
                (d.position[:2] - start[:2])
                @ (o[:2] - start[:2])
                / np.sum((o[:2] - start[:2]) ** 2)
                for o in others
            ]
            assert any(0.2 < f < 0.9 for f in fractions), fractions


def test_datagen_round_trips_and_resumes(tmp_path, capsys) -> None:
    out = tmp_path / "data"
    argv = ["--tasks", "touch,push", "--episodes-per-task", "1", "--out", str(out), "--quiet"]
    assert datagen.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 2 and summary["written"] == 2
    assert summary["tasks"]["touch"]["expert_success_rate"] == 1.0
    assert 0 < summary["dataset_mb_per_episode"] < 1.0
    data = EpisodeDataset(out)
    cfg = GR2Config.from_preset("gr2-tiny")
    meta = data.meta
    assert meta.views == cfg.views and meta.image_size == cfg.image_size
    assert meta.action_horizon == cfg.action_horizon and meta.waypoint_dt_s == cfg.waypoint_dt_s
    assert meta.step_period_s == 0.2 and "scripted expert" in meta.source
    episodes = list(data)
    assert [(e.info.task, e.info.seed) for e in episodes] == [("touch", 0), ("push", 0)]
    for episode in episodes:
        t = episode.steps
        assert episode.info.success and episode.info.instruction.startswith(episode.info.task)
        assert episode.images["head"].shape == (t, 64, 64, 3)
        assert episode.actions.shape == (t, 10, 8) and episode.action_valid.all()
        np.testing.assert_allclose(
            episode.actions[:-1, 1, :3], episode.states[1:, :3], atol=1e-5
        )  # float32 on disk
        assert episode.info.extra["task"]["success"]
    # Re-running continues: nothing new for the same request, one more seed per task for 2.
    assert datagen.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 0
    argv[3] = "2"
    assert datagen.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    assert sorted((i.task, i.seed) for i in EpisodeDataset(out).index) == [
        ("push", 0),
        ("push", 1),
        ("touch", 0),
        ("touch", 1),
    ]
    # --targets all: the other two blocks of touch seed 0 (its drawn one is there already).
    argv_all = ["--tasks", "touch", "--episodes-per-task", "4", "--out", str(out), "--quiet"]
    assert datagen.main([*argv_all, "--targets", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    touch_zero = [i for i in EpisodeDataset(out).index if i.task == "touch" and i.seed == 0]
    assert sorted(i.instruction for i in touch_zero) == sorted(
        t.instruction for t in get_task("touch").instances(0)
    )
    # --detour: recovery demonstrations, in their own dataset.
    argv_detour = ["--tasks", "touch", "--episodes-per-task", "1", "--quiet", "--detour"]
    assert datagen.main([*argv_detour, "--out", str(tmp_path / "recovery")]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 1
    (recovered,) = list(EpisodeDataset(tmp_path / "recovery"))
    assert recovered.info.extra["detour"]["kind"] in DEFAULT_DETOURS
    assert not recovered.action_valid[0].any() and recovered.action_valid[-1].all()
    with pytest.raises(SystemExit, match="unknown detour kind"):
        datagen.main([*argv_detour, "sideways", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    with pytest.raises(SystemExit, match="held out"):
        datagen.main([*argv, "--seed-start", str(EVAL_SEED_START)])
    with pytest.raises(SystemExit, match="unknown task"):
        datagen.main(["--tasks", "juggle", "--episodes-per-task", "1", "--out", str(out)])
