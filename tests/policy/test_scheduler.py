"""The batch scheduler: control batching rules and video at lower priority.

Hand-built requests and explicit ``now`` values (binary-exact floats), no clock and no
sleeping: every rule of the module docstring is checked by the decisions it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from gr2_policy.engine.scheduler import BatchScheduler, ControlRequest, Decision, VideoJob

DELAY = 0.25


@dataclass(eq=False)
class Step:
    """A control step's payload (compared by identity, as the scheduler does)."""

    name: str


Scheduler = BatchScheduler[Step, int]


def request(episode_id: str, arrival_s: float, name: str | None = None) -> ControlRequest[Step]:
    return ControlRequest(episode_id, arrival_s, Step(name or episode_id))


def names(batch: list[ControlRequest[Step]]) -> list[str]:
    return [r.payload.name for r in batch]


def take_batch(decision: Decision[Step, int] | None) -> list[str]:
    """The payload names of a control-batch decision (fails on anything else)."""
    assert decision is not None
    assert decision.video is None
    assert decision.batch
    return names(decision.batch)


def take_video(decision: Decision[Step, int] | None) -> int:
    """The job id of a video decision (fails on anything else)."""
    assert decision is not None
    assert decision.batch == []
    assert decision.video is not None
    return decision.video.job_id


# -- when a batch goes ----------------------------------------------------------------------


def test_lone_step_of_the_only_live_episode_is_ready_at_once() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    sched.add_control(request("a", 10.0))
    assert take_batch(sched.next(10.0, live_episodes=1)) == ["a"]
    assert sched.queued_control == 0
    assert sched.wait_s(10.0) is None
    assert sched.next(10.0, live_episodes=1) is None


def test_step_waits_for_other_live_episodes_up_to_the_delay() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    sched.add_control(request("a", 10.0))
    assert sched.next(10.0, live_episodes=3) is None
    assert sched.wait_s(10.0) == DELAY
    assert sched.next(10.125, live_episodes=3) is None
    assert sched.wait_s(10.125) == 0.125
    assert sched.queued_control == 1
    assert take_batch(sched.next(10.25, live_episodes=3)) == ["a"]
    assert sched.queued_control == 0


def test_wait_s_is_zero_once_overdue() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    sched.add_control(request("a", 10.0))
    assert sched.wait_s(11.0) == 0.0
    assert take_batch(sched.next(11.0, live_episodes=3)) == ["a"]


def test_a_step_of_every_live_episode_goes_at_once() -> None:
    sched = Scheduler(max_batch_size=8, max_batch_delay_s=DELAY)
    sched.add_control(request("a", 0.0))
    sched.add_control(request("b", 0.0))
    assert sched.next(0.0, live_episodes=3) is None
    sched.add_control(request("c", 0.0))
    assert take_batch(sched.next(0.0, live_episodes=3)) == ["a", "b", "c"]


def test_zero_delay_sends_every_step_at_once() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=0.0)
    sched.add_control(request("a", 5.0))
    assert sched.wait_s(5.0) == 0.0
    assert take_batch(sched.next(5.0, live_episodes=10)) == ["a"]


def test_full_batch_is_ready_at_once() -> None:
    sched = Scheduler(max_batch_size=3, max_batch_delay_s=DELAY)
    for episode in ("a", "b", "c"):
        sched.add_control(request(episode, 0.0))
    assert take_batch(sched.next(0.0, live_episodes=10)) == ["a", "b", "c"]
    assert sched.queued_control == 0


def test_more_requests_than_a_batch_take_the_first_in_fifo_order() -> None:
    sched = Scheduler(max_batch_size=3, max_batch_delay_s=DELAY)
    for i, episode in enumerate(("a", "b", "c", "d", "e")):
        sched.add_control(request(episode, i * 0.125))
    assert take_batch(sched.next(0.5, live_episodes=10)) == ["a", "b", "c"]
    assert sched.queued_control == 2
    # The rest (2 of 10 live episodes) wait for the delay of their oldest step (d, at 0.375).
    assert sched.next(0.5, live_episodes=10) is None
    assert sched.wait_s(0.5) == 0.125
    assert take_batch(sched.next(0.625, live_episodes=10)) == ["d", "e"]
    assert sched.queued_control == 0


# -- one step per episode -------------------------------------------------------------------


def test_two_steps_of_one_episode_never_share_a_batch() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    sched.add_control(request("a", 0.0, "a1"))
    sched.add_control(request("a", 0.0, "a2"))
    sched.add_control(request("b", 0.0, "b1"))
    assert take_batch(sched.next(0.0, live_episodes=2)) == ["a1", "b1"]
    assert sched.queued_control == 1
    assert take_batch(sched.next(0.0, live_episodes=1)) == ["a2"]
    assert sched.queued_control == 0


def test_full_batch_skips_a_second_step_of_an_episode_for_a_later_one() -> None:
    # Two distinct episodes fill a batch of 2: a2 is skipped over, b1 joins, a2 stays.
    sched = Scheduler(max_batch_size=2, max_batch_delay_s=DELAY)
    sched.add_control(request("a", 0.0, "a1"))
    sched.add_control(request("a", 0.0, "a2"))
    sched.add_control(request("b", 0.0, "b1"))
    assert take_batch(sched.next(0.0, live_episodes=10)) == ["a1", "b1"]
    assert sched.queued_control == 1


def test_only_repeated_steps_of_one_episode_go_one_per_batch() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    for i in range(3):
        sched.add_control(request("a", 0.0, f"a{i}"))
    batches = [take_batch(sched.next(1.0, live_episodes=1)) for _ in range(3)]
    assert batches == [["a0"], ["a1"], ["a2"]]
    assert sched.next(1.0, live_episodes=1) is None


# -- video priority and queue edits ---------------------------------------------------------


def test_video_does_not_start_while_a_control_batch_is_filling() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    sched.add_video(VideoJob(1, 0))
    waiting = request("a", 0.0)
    sched.add_control(waiting)
    assert sched.next(0.0, live_episodes=3) is None  # control waits, and video must not run
    assert sched.queued_video == 1
    assert sched.wait_s(0.0) == DELAY
    sched.remove_control(waiting.payload)
    assert sched.queued_control == 0
    assert sched.wait_s(0.0) is None
    assert take_video(sched.next(0.0, live_episodes=3)) == 1
    assert sched.queued_video == 0
    assert sched.next(0.0, live_episodes=3) is None


def test_control_batch_goes_before_queued_video() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    sched.add_video(VideoJob(1, 0))
    sched.add_control(request("a", 0.0))
    assert take_batch(sched.next(0.0, live_episodes=1)) == ["a"]
    assert take_video(sched.next(0.0, live_episodes=1)) == 1


def test_requeue_video_gives_round_robin() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    sched.add_video(VideoJob(1, 0))
    sched.add_video(VideoJob(2, 0))
    order = []
    for _ in range(5):
        decision = sched.next(0.0, live_episodes=0)
        assert decision is not None
        assert decision.video is not None
        order.append(decision.video.job_id)
        sched.requeue_video(decision.video)
    assert order == [1, 2, 1, 2, 1]
    assert sched.queued_video == 2


def test_remove_video_drops_the_job() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    for job_id in (1, 2, 3):
        sched.add_video(VideoJob(job_id, 0))
    sched.remove_video(2)
    sched.remove_video(99)  # unknown: nothing happens
    assert sched.queued_video == 2
    assert take_video(sched.next(0.0, live_episodes=0)) == 1
    assert take_video(sched.next(0.0, live_episodes=0)) == 3
    assert sched.next(0.0, live_episodes=0) is None


def test_remove_control_drops_only_that_step() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    first = request("a", 0.0, "a1")
    second = request("b", 0.0, "b1")
    twin = request("c", 0.0, "b1")  # an equal-looking payload, but another step
    for r in (first, second, twin):
        sched.add_control(r)
    sched.remove_control(second.payload)
    assert sched.queued_control == 2
    batch = sched.next(0.0, live_episodes=2)
    assert batch is not None
    assert [r.payload for r in batch.batch] == [first.payload, twin.payload]
    assert batch.batch[1].payload is twin.payload


def test_remove_control_of_the_oldest_step_moves_the_deadline() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    old = request("a", 0.0)
    sched.add_control(old)
    sched.add_control(request("b", 0.125))
    assert sched.wait_s(0.0) == DELAY
    sched.remove_control(old.payload)
    assert sched.wait_s(0.0) == 0.375


def test_drain_control_empties_in_fifo_order() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    sched.add_video(VideoJob(7, 0))
    sched.add_control(request("a", 0.0, "a1"))
    sched.add_control(request("a", 0.0, "a2"))
    sched.add_control(request("b", 0.0, "b1"))
    assert names(sched.drain_control()) == ["a1", "a2", "b1"]
    assert sched.queued_control == 0
    assert sched.wait_s(0.0) is None
    assert sched.drain_control() == []
    assert sched.queued_video == 1  # video is not drained
    assert take_video(sched.next(0.0, live_episodes=3)) == 7


# -- a simulated timeline -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("live_episodes", "batch_at"),
    [
        (1, 3.0),  # the only live episode: its batch goes right after the running unit
        (2, 3.25),  # another may join: its batch waits out the delay, with the GPU kept idle
    ],
)
def test_control_step_waits_for_at_most_one_video_unit(live_episodes: int, batch_at: float) -> None:
    """Engine loop: each decision runs for one time unit. A video job of 8 units starts at
    t=0; a control step arrives at t=2.5, while the unit started at t=2 runs. The next thing
    the engine runs is that control batch (at t=3, or at arrival + delay = 3.25 when it may
    wait for another episode): never another video unit first."""
    delay = 0.75
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=delay)
    sched.add_video(VideoJob(1, 8))  # payload: units left
    arrivals = [request("a", 2.5)]
    log: list[tuple[float, str]] = []
    t = 0.0
    for _ in range(100):
        while arrivals and arrivals[0].arrival_s <= t:
            sched.add_control(arrivals.pop(0))
        decision = sched.next(t, live_episodes=live_episodes)
        if decision is None:
            wait = sched.wait_s(t)
            if wait is None:
                if not arrivals:
                    break
                t = arrivals[0].arrival_s  # idle until the next arrival
            else:
                assert wait > 0
                t += wait
            continue
        if decision.video is not None:
            log.append((t, "video"))
            job = decision.video
            job.payload -= 1
            if job.payload > 0:
                sched.requeue_video(job)
        else:
            log.append((t, "+".join(names(decision.batch))))
        t += 1.0
    else:
        pytest.fail("the simulated engine did not finish")

    ran = [what for _, what in log]
    assert ran == ["video"] * 3 + ["a"] + ["video"] * 5
    batch_time = dict((what, when) for when, what in log)["a"]
    assert batch_time == batch_at
    # Video units before the batch: only those started before the arrival (0, 1, 2).
    assert [when for when, what in log if what == "video" and when < batch_time] == [0, 1, 2]
    assert sched.queued_control == 0
    assert sched.queued_video == 0


def test_decision_holds_exactly_one_kind_of_work() -> None:
    sched = Scheduler(max_batch_size=4, max_batch_delay_s=DELAY)
    sched.add_video(VideoJob(1, 0))
    sched.add_control(request("a", 0.0))
    control = sched.next(0.0, live_episodes=1)
    video = sched.next(0.0, live_episodes=1)
    assert control is not None
    assert video is not None
    assert (bool(control.batch), control.video is None) == (True, True)
    assert (video.batch, video.video is not None) == ([], True)


# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -1])
def test_max_batch_size_below_one_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchScheduler(max_batch_size=size, max_batch_delay_s=DELAY)


def test_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_delay_s"):
        BatchScheduler(max_batch_size=4, max_batch_delay_s=-0.001)


def test_next_and_wait_s_agree_at_the_deadline() -> None:
    """At arrival + delay (in float arithmetic) the batch is due by both accounts, so the
    engine loop never waits 0 s for a batch that ``next`` still holds back."""
    scheduler: BatchScheduler[object, object] = BatchScheduler(4, 0.1)
    scheduler.add_control(ControlRequest("a", 0.7, object()))
    now = 0.7 + 0.1
    assert scheduler.wait_s(now) == 0.0
    decision = scheduler.next(now, live_episodes=3)
    assert decision is not None and len(decision.batch) == 1
