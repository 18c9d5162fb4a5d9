"""The sim task suite: instances, the seed split, and the success checks on real MuJoCo states
(blocks moved by writing ``qpos``, a grasp made by really closing the gripper)."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco
import numpy as np
import pytest
from gr2_wbc.cli import build_parser, resolve_task
from gr2_wbc.robots.sim import scene
from gr2_wbc.robots.sim.backend import MujocoGen3
from gr2_wbc.tasks import (
    EVAL_SEED_START,
    PAD_GEOMS,
    PUSH_DISTANCE_M,
    SIDES,
    TASKS,
    TaskCheckedRobot,
    TaskError,
    TaskMonitor,
    block_extents,
    check_task,
    eval_seeds,
    get_task,
    is_eval_seed,
    sample_task,
)

HALF = scene.BLOCK_SIZE_M / 2


@pytest.fixture
def sim() -> Iterator[MujocoGen3]:
    backend = MujocoGen3(seed=3)
    yield backend
    backend.close()


def place_block(sim: MujocoGen3, colour: str, position, yaw: float = 0.0) -> None:
    """Teleport a block (free joint qpos), at rest, and update contacts."""
    joint = sim.model.joint(f"block_{colour}")
    adr, dof = int(joint.qposadr[0]), int(joint.dofadr[0])
    sim.data.qpos[adr : adr + 3] = position
    sim.data.qpos[adr + 3 : adr + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
    sim.data.qvel[dof : dof + 6] = 0.0
    mujoco.mj_forward(sim.model, sim.data)


# -- instances and seeds ------------------------------------------------------------------


def test_registry_and_instructions() -> None:
    assert {"touch", "pick", "push"} <= set(TASKS)
    for seed in range(30):
        touch, pick, push = (sample_task(n, seed) for n in ("touch", "pick", "push"))
        for inst in (touch, pick, push):
            assert inst.seed == seed and inst.colour in scene.BLOCK_COLOURS
            assert inst == sample_task(inst.name, seed)  # deterministic
        assert touch.instruction == f"touch the {touch.colour} block"
        assert pick.instruction == f"pick up the {pick.colour} block"
        side = push.params["side"]
        assert side in SIDES and push.params["direction_y"] == SIDES[side]
        assert push.instruction == f"push the {push.colour} block to the {side}"
    # Every colour and side occurs; targets are drawn per task (not all the same).
    many = [sample_task("push", s) for s in range(200)]
    assert {i.colour for i in many} == set(scene.BLOCK_COLOURS)
    assert {i.params["side"] for i in many} == {"left", "right"}
    touch_colours = [sample_task("touch", s).colour for s in range(200)]
    pick_colours = [sample_task("pick", s).colour for s in range(200)]
    assert touch_colours != pick_colours


def test_instances_give_every_block_of_a_scene_as_the_target() -> None:
    colours = set(scene.BLOCK_COLOURS)
    for seed in range(20):
        for name in ("touch", "pick"):
            all_of_seed = get_task(name).instances(seed)
            assert all_of_seed[0] == sample_task(name, seed)  # the drawn one first
            assert {i.colour for i in all_of_seed} == colours and len(all_of_seed) == 3
            assert len({i.instruction for i in all_of_seed}) == 3
            assert all(i.seed == seed and i.name == name for i in all_of_seed)
        pushes = get_task("push").instances(seed)
        assert pushes[0] == sample_task("push", seed)
        assert len({i.colour for i in pushes}) == len(pushes)
        layout = scene.block_layout(seed)
        for inst in pushes:  # every push it offers has a clear path
            assert get_task("push").path_clear(layout, inst.colour, inst.params["direction_y"])
            assert inst.instruction == f"push the {inst.colour} block to the {inst.params['side']}"
    # Across seeds, push offers more than the drawn target (most blocks have a clear side).
    assert sum(len(get_task("push").instances(s)) for s in range(20)) > 40


def test_unknown_task_and_bad_seed() -> None:
    with pytest.raises(TaskError, match="known: touch, pick, push"):
        sample_task("juggle", 0)
    with pytest.raises(TaskError):
        sample_task("touch", -1)


def test_seed_split() -> None:
    assert EVAL_SEED_START == 1_000_000
    assert not is_eval_seed(0) and not is_eval_seed(EVAL_SEED_START - 1)
    seeds = eval_seeds(5)
    assert seeds == list(range(EVAL_SEED_START, EVAL_SEED_START + 5))
    assert all(is_eval_seed(s) for s in seeds)
    assert eval_seeds(2, start=10) == [EVAL_SEED_START + 10, EVAL_SEED_START + 11]
    # Held-out seeds give other scenes than the training seeds with the same offset.
    assert scene.block_layout(EVAL_SEED_START) != scene.block_layout(0)


def test_push_sides_have_a_clear_path() -> None:
    push = TASKS["push"]
    clear = 0
    for seed in range(300):
        inst = sample_task("push", seed)
        clear += push.path_clear(scene.block_layout(seed), inst.colour, inst.params["direction_y"])
    assert clear >= 0.95 * 300


def test_resolve_task_for_the_run_command() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "--task", "pick", "--seed", "7"])
    inst = resolve_task(args)
    assert inst == sample_task("pick", 7) and args.instruction == inst.instruction
    assert args.stop_on_success is True
    args = parser.parse_args(["run", "--task", "pick", "--seed", "7", "--no-stop-on-success"])
    assert args.stop_on_success is False
    good = ["run", "--task", "pick", "--seed", "7", "--instruction", inst.instruction]
    assert resolve_task(parser.parse_args(good)) == inst
    for argv, message in (
        (["run", "--task", "pick", "--seed", "7", "--instruction", "dance"], "does not match"),
        (["run", "--task", "juggle"], "unknown task"),
        (["run", "--task", "pick", "--robot", "kortex"], "needs --robot sim"),
        (["run"], "--instruction TEXT or --task"),
    ):
        with pytest.raises(SystemExit, match=message):
            resolve_task(parser.parse_args(argv))
    assert resolve_task(parser.parse_args(["run", "--instruction", "wave"])) is None


# -- success checks on the sim ------------------------------------------------------------


def test_nothing_succeeds_at_the_start() -> None:
    for seed in (0, 1, 2, EVAL_SEED_START):
        backend = MujocoGen3(seed=seed)
        start = backend.block_positions()
        for name in TASKS:
            outcome = check_task(backend, sample_task(name, seed), start)
            assert not outcome.success, (name, seed, outcome.details)
        backend.close()


def test_block_extents_of_a_tilted_block() -> None:
    pose = np.eye(4)
    pose[:3, 3] = (0.5, 0.0, HALF)
    bottom, top = block_extents(pose)
    assert bottom == pytest.approx(0.0) and np.allclose(top, (0.5, 0.0, 2 * HALF))
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    pose[:3, :3] = [[1, 0, 0], [0, c, -s], [0, s, c]]  # on an edge: lowest point lower
    bottom, _ = block_extents(pose)
    assert bottom == pytest.approx(HALF - HALF * np.sqrt(2))
    pose[:3, :3] = [[1, 0, 0], [0, -1, 0], [0, 0, -1]]  # upside down: the top is still up
    _, top = block_extents(pose)
    assert top[2] == pytest.approx(2 * HALF)


def test_touch_by_proximity_and_by_contact(sim: MujocoGen3) -> None:
    inst = sample_task("touch", 3)
    start = sim.block_positions()
    tool = sim.read_state().ee_position
    # Top face 1.5 cm under the tool point, between the open fingers: near, no contact.
    place_block(sim, inst.colour, tool - np.array([0.0, 0.0, HALF + 0.015]))
    outcome = check_task(sim, inst, start)
    assert outcome.success and outcome.details["near"]
    assert outcome.details["tool_to_top_face_m"] == pytest.approx(0.015, abs=1e-3)
    assert outcome.details["robot_contacts"] == []
    # 4 cm under the tool: neither near nor touching.
    place_block(sim, inst.colour, tool - np.array([0.0, 0.0, 0.04 + HALF]))
    outcome = check_task(sim, inst, start)
    assert not outcome.success and not outcome.details["near"]
    # Against the outside of the left finger (tool y = base y at HOME_Q), 7.5 cm from the
    # top face's centre: not near, but touching.
    pad = sim.data.geom_xpos[sim.model.geom(PAD_GEOMS[0]).id]
    place_block(sim, inst.colour, pad + np.array([0.0, 0.005 + HALF + 0.0005, 0.0]))
    outcome = check_task(sim, inst, start)
    assert not outcome.details["near"]
    assert outcome.success and outcome.details["robot_contacts"] == ["finger_left"]
    # Another block near the tool does not count.
    other = next(c for c in scene.BLOCK_COLOURS if c != inst.colour)
    place_block(sim, inst.colour, start[inst.colour])
    place_block(sim, other, tool - np.array([0.0, 0.0, HALF + 0.01]))
    assert not check_task(sim, inst, start).success


def test_pick_needs_the_block_lifted_and_held(sim: MujocoGen3) -> None:
    inst = sample_task("pick", 3)
    start = sim.block_positions()
    state = sim.read_state()
    # Lifted but not held (teleported up, fingers open): not a pick.
    place_block(sim, inst.colour, start[inst.colour] + np.array([0.0, 0.0, 0.10]))
    outcome = check_task(sim, inst, start)
    assert outcome.details["block_bottom_height_m"] >= 0.05
    assert not outcome.success and not outcome.details["pads_in_contact"]
    # Held at the tool point between the open fingers while the gripper really closes on
    # it; let go once both pads touch it, then the grip alone holds it for 0.5 s.
    sim.send_command(state.q, np.zeros(7), 1.0)
    for _ in range(200):
        if all(p in sim.block_contacts(inst.colour) for p in PAD_GEOMS):
            break
        place_block(sim, inst.colour, state.ee_position)
        sim.advance(0.005)
    sim.advance(0.5)
    outcome = check_task(sim, inst, start)
    assert outcome.success, outcome.details
    assert 0.4 < outcome.details["gripper"] < 0.7  # stopped by the block
    assert outcome.details["block_bottom_height_m"] > 0.1
    # Opening the gripper drops it: no longer picked.
    sim.send_command(state.q, np.zeros(7), 0.0)
    sim.advance(0.6)
    outcome = check_task(sim, inst, start)
    assert not outcome.success and outcome.details["block_bottom_height_m"] < 0.01


@pytest.mark.parametrize("side", ["left", "right"])
def test_push_needs_8_cm_towards_the_side_on_the_table(sim: MujocoGen3, side: str) -> None:
    base = sample_task("push", 3)
    inst = type(base)(
        "push", 3, f"push the {base.colour} block to the {side}", base.colour,
        {"side": side, "direction_y": SIDES[side]},
    )  # fmt: skip
    start = sim.block_positions()
    origin = start[base.colour]
    d = SIDES[side]
    for moved, lifted, expected in (
        (PUSH_DISTANCE_M + 0.01, 0.0, True),
        (-(PUSH_DISTANCE_M + 0.01), 0.0, False),  # the other way
        (PUSH_DISTANCE_M - 0.02, 0.0, False),  # not far enough
        (PUSH_DISTANCE_M + 0.01, 0.05, False),  # far enough, but off the table (held up)
    ):
        place_block(sim, base.colour, origin + np.array([0.0, d * moved, lifted]))
        outcome = check_task(sim, inst, start)
        assert outcome.success == expected, (moved, lifted, outcome.details)
        assert outcome.details["moved_along_side_m"] == pytest.approx(moved, abs=1e-6)


def test_monitor_checks_at_observation_times_and_settles(sim: MujocoGen3) -> None:
    inst = sample_task("push", 3)
    calls: list[float] = []
    monitor = TaskMonitor(
        sim, inst, 0.2, settle_s=0.5, on_settled=lambda: calls.append(sim.read_state().time_s)
    )
    robot = TaskCheckedRobot(sim, monitor)
    assert robot.camera_names == sim.camera_names and robot.name == "sim"
    q = sim.read_state().q
    for _ in range(80):  # 0.4 s: checks at 0.005 (first tick), 0.2 and 0.4
        robot.send_command(q, np.zeros(7), 0.0)
        robot.advance(0.005)
    assert monitor.checks == 3 and not monitor.success and not calls
    origin = monitor.start_blocks[inst.colour]
    place_block(sim, inst.colour, origin + np.array([0.0, inst.params["direction_y"] * 0.1, 0.0]))
    for _ in range(200):  # 1 s more
        robot.send_command(q, np.zeros(7), 0.0)
        robot.advance(0.005)
    assert monitor.success and monitor.success_time_s == pytest.approx(0.6, abs=1e-6)
    assert calls == [pytest.approx(1.1, abs=1e-6)]  # once, 0.5 s after the success
    summary = monitor.summary()
    assert summary["success"] and summary["success_time_s"] == pytest.approx(0.6)
    assert summary["instruction"] == inst.instruction and summary["seed"] == 3
    assert summary["details"]["moved_along_side_m"] == pytest.approx(0.1, abs=2e-3)
    assert summary["final"]["success"]
