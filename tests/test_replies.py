"""Reply jobs: re-attaching listeners, Stop, the grace period, slots and failures, with real threads."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.replies import ReplyAlreadyRunningError, ReplyJob, ReplyJobs, ReplySnapshot

WAIT = 5.0
"""Generous bound for anything that should happen at once; tests wait on conditions, never for it."""

KEY = (1, "conversation-a")
OTHER_KEY = (1, "conversation-b")


def notice_for(error: BaseException) -> str:
    return f"Sorry: {error}"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Puppet:
    """A work function the test drives: it publishes what it is told and ends when told or cancelled."""

    def __init__(self) -> None:
        self._orders: queue.Queue[tuple[str, Any, threading.Event]] = queue.Queue()
        self.started = threading.Event()
        self.saw_cancel = threading.Event()

    def say(self, chunk: str) -> None:
        """Have the work publish `chunk`, and wait until it has."""
        published = threading.Event()
        self._orders.put(("say", chunk, published))
        assert published.wait(WAIT), f"the work did not publish {chunk!r}"

    def finish(self, outcome: Any = None) -> None:
        self._orders.put(("finish", outcome, threading.Event()))

    def __call__(self, job: ReplyJob) -> Any:
        self.started.set()
        text = ""
        while not job.cancel.is_set():
            try:
                kind, value, published = self._orders.get(timeout=0.005)
            except queue.Empty:
                continue
            if kind == "finish":
                return value
            text += value
            job.publish(text, message_id=7)
            published.set()
        self.saw_cancel.set()
        return "cancelled"


def wait_until(predicate: Callable[[], bool], *, timeout_s: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def final(job: ReplyJob) -> ReplySnapshot:
    """The last snapshot a new listener sees (the done one, unless the job stalls past WAIT)."""
    return list(job.listen(min_interval_s=0, timeout_s=WAIT))[-1]


@pytest.fixture
def make_jobs() -> Iterator[Callable[..., ReplyJobs]]:
    made: list[ReplyJobs] = []

    def make(**options: Any) -> ReplyJobs:
        made.append(ReplyJobs(**{"max_running": 2, **options}))
        return made[-1]

    yield make
    for jobs in made:
        jobs.close(timeout_s=WAIT)


def test_a_late_listener_gets_the_text_so_far_then_the_rest_and_the_outcome(make_jobs) -> None:
    jobs = make_jobs()
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)
    puppet.say("Hello")
    puppet.say(", wor")

    listener = job.listen(min_interval_s=0, timeout_s=WAIT)
    first = next(listener)
    assert first == ReplySnapshot(text="Hello, wor", message_id=7, waiting=False, done=False, notice=None, outcome=None)

    puppet.say("ld")
    puppet.finish({"tokens": 3})
    rest = list(listener)
    assert rest[-1] == ReplySnapshot(
        text="Hello, world", message_id=7, waiting=False, done=True, notice=None, outcome={"tokens": 3}
    )
    assert [s.done for s in rest] == [False] * (len(rest) - 1) + [True]
    assert all(s.text.startswith("Hello, wor") for s in rest)


def test_two_listeners_both_see_the_final_text(make_jobs) -> None:
    jobs = make_jobs()
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)
    seen: dict[str, list[ReplySnapshot]] = {}
    attached = [threading.Event(), threading.Event()]

    def listen(name: str, ready: threading.Event) -> None:
        listener = job.listen(min_interval_s=0, timeout_s=WAIT)
        seen[name] = [next(listener)]
        ready.set()
        seen[name] += list(listener)

    threads = [threading.Thread(target=listen, args=(name, ready)) for name, ready in zip("ab", attached, strict=True)]
    for thread in threads:
        thread.start()
    assert all(ready.wait(WAIT) for ready in attached)
    for chunk in ("one ", "two ", "three"):
        puppet.say(chunk)
    puppet.finish("ok")
    for thread in threads:
        thread.join(WAIT)

    for name in "ab":
        assert seen[name][-1].done and seen[name][-1].text == "one two three" and seen[name][-1].outcome == "ok"


def test_closing_one_listener_leaves_the_work_to_the_other(make_jobs) -> None:
    clock = FakeClock()
    jobs = make_jobs(grace_s=1.0, clock=clock, check_every_s=0.01)
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)
    first, second = job.listen(min_interval_s=0, timeout_s=WAIT), job.listen(min_interval_s=0, timeout_s=WAIT)
    next(first)
    next(second)

    first.close()
    clock.advance(10.0)  # far past the grace period, but the second listener is still there
    puppet.say("still going")
    puppet.finish("ok")

    last = list(second)[-1]
    assert last.done and last.text == "still going" and last.outcome == "ok"
    assert not job.cancel.is_set()


def test_the_work_goes_on_within_the_grace_period_after_the_last_listener_left(make_jobs) -> None:
    clock = FakeClock()
    jobs = make_jobs(grace_s=1.0, clock=clock, check_every_s=0.01)
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)
    listener = job.listen(min_interval_s=0, timeout_s=WAIT)
    next(listener)
    clock.advance(10.0)  # a listener is attached: time without one has not started
    listener.close()     # the grace period starts now

    clock.advance(0.9)
    puppet.say("after the page left")  # fails if the work was stopped
    assert not job.cancel.is_set()

    clock.advance(0.2)
    assert puppet.saw_cancel.wait(WAIT)
    assert final(job).text == "after the page left"


def test_a_job_nobody_listens_to_is_cancelled_after_the_grace_period(make_jobs) -> None:
    clock = FakeClock()
    jobs = make_jobs(grace_s=1.0, clock=clock, check_every_s=0.01)
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)
    assert puppet.started.wait(WAIT)

    clock.advance(0.9)
    assert not puppet.saw_cancel.wait(0.1)  # the watchdog has looked several times by now
    clock.advance(0.2)
    assert puppet.saw_cancel.wait(WAIT)
    assert final(job) == ReplySnapshot(
        text="", message_id=None, waiting=False, done=True, notice=None, outcome="cancelled"
    )


def test_the_grace_period_runs_on_the_real_clock(make_jobs) -> None:
    jobs = make_jobs(grace_s=0.2)
    puppet = Puppet()
    started = time.monotonic()
    jobs.start(KEY, puppet, notice_for=notice_for)

    assert puppet.saw_cancel.wait(WAIT)
    assert time.monotonic() - started >= 0.2


def test_cancel_stops_the_running_job_and_the_work_sees_it(make_jobs) -> None:
    jobs = make_jobs()
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)
    puppet.say("half a sent")

    assert jobs.cancel(OTHER_KEY) is False
    assert jobs.cancel(KEY) is True
    assert puppet.saw_cancel.wait(WAIT)
    last = final(job)
    assert last.done and last.text == "half a sent" and last.outcome == "cancelled"
    assert jobs.running(KEY) is False
    assert jobs.cancel(KEY) is False


def test_with_one_slot_the_second_job_waits_until_the_first_ends(make_jobs) -> None:
    jobs = make_jobs(max_running=1)
    first, second = Puppet(), Puppet()
    first_job = jobs.start(KEY, first, notice_for=notice_for)
    assert first.started.wait(WAIT)
    second_job = jobs.start(OTHER_KEY, second, notice_for=notice_for)
    listener = second_job.listen(min_interval_s=0, timeout_s=WAIT)

    assert next(listener).waiting is True
    assert not second.started.wait(0.1)
    assert jobs.running(OTHER_KEY) is True

    first.finish("first")
    assert second.started.wait(WAIT)
    assert next(listener).waiting is False
    assert first_job.snapshot().outcome == "first"


def test_a_job_cancelled_while_waiting_never_runs(make_jobs) -> None:
    jobs = make_jobs(max_running=1)
    first, second = Puppet(), Puppet()
    jobs.start(KEY, first, notice_for=notice_for)
    assert first.started.wait(WAIT)
    second_job = jobs.start(OTHER_KEY, second, notice_for=notice_for)

    assert jobs.cancel(OTHER_KEY) is True
    assert final(second_job) == ReplySnapshot(
        text="", message_id=None, waiting=False, done=True, notice=None, outcome=None
    )
    first.finish()
    assert not second.started.wait(0.1)


def test_a_failing_work_ends_with_the_notice_and_new_jobs_still_run(make_jobs, caplog) -> None:
    jobs = make_jobs(max_running=1)

    def failing(job: ReplyJob) -> None:
        job.publish("partial")
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="app.replies"):
        last = final(jobs.start(KEY, failing, notice_for=notice_for))
    assert last == ReplySnapshot(text="partial", message_id=None, waiting=False, done=True, notice="Sorry: boom",
                                 outcome=None)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and failures[0].exc_info[0] is ValueError

    assert final(jobs.start(KEY, lambda job: "fine", notice_for=notice_for)).outcome == "fine"


def test_starting_while_a_reply_runs_is_refused_and_a_finished_one_is_replaced(make_jobs) -> None:
    jobs = make_jobs()
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)

    with pytest.raises(ReplyAlreadyRunningError, match="still being written in this conversation"):
        jobs.start(KEY, Puppet(), notice_for=notice_for)
    assert jobs.get(KEY) is job and jobs.running(KEY)

    puppet.finish()
    assert final(job).done
    again = jobs.start(KEY, lambda job: "second", notice_for=notice_for)
    assert again is not job and jobs.get(KEY) is again
    assert final(again).outcome == "second"


def test_get_keeps_a_finished_job_for_the_grace_period_then_forgets_it(make_jobs) -> None:
    clock = FakeClock()
    jobs = make_jobs(grace_s=5.0, clock=clock, check_every_s=0.01)
    job = jobs.start(KEY, lambda job: "stats", notice_for=notice_for)
    assert final(job).outcome == "stats"

    clock.advance(4.9)
    assert jobs.get(KEY) is job and not jobs.running(KEY)
    clock.advance(0.2)
    assert jobs.get(KEY) is None
    assert jobs.get(OTHER_KEY) is None


def test_a_slow_listener_gets_the_newest_text_not_every_chunk(make_jobs) -> None:
    jobs = make_jobs()
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)
    listener = job.listen(min_interval_s=0, timeout_s=WAIT)
    next(listener)

    for _ in range(20):
        puppet.say("x")
    puppet.finish("ok")
    assert wait_until(lambda: job.done)
    assert [(s.text, s.done) for s in listener] == [("x" * 20, True)]


def test_snapshots_come_no_more_often_than_the_interval_but_the_end_comes_at_once(make_jobs) -> None:
    jobs = make_jobs()
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)
    assert puppet.started.wait(WAIT)

    paced = job.listen(min_interval_s=0.2, timeout_s=WAIT)
    before_first = time.monotonic()
    next(paced)
    puppet.say("a")
    assert next(paced).text == "a"
    assert time.monotonic() - before_first >= 0.2

    slow = job.listen(min_interval_s=60.0, timeout_s=WAIT)
    next(slow)
    puppet.say("b")
    puppet.finish("ok")
    last = next(slow)  # would wait a minute if the end were paced like the text
    assert last.done and last.text == "ab"
    paced.close()


def test_a_listener_with_a_timeout_ends_when_nothing_changes(make_jobs) -> None:
    jobs = make_jobs()
    puppet = Puppet()
    job = jobs.start(KEY, puppet, notice_for=notice_for)
    puppet.say("stuck")

    snapshots = list(job.listen(min_interval_s=0, timeout_s=0.05))
    assert [(s.text, s.done) for s in snapshots] == [("stuck", False)]


def test_close_cancels_every_job_and_refuses_new_ones() -> None:
    jobs = ReplyJobs(max_running=1)
    running, waiting = Puppet(), Puppet()
    running_job = jobs.start(KEY, running, notice_for=notice_for)
    assert running.started.wait(WAIT)
    waiting_job = jobs.start(OTHER_KEY, waiting, notice_for=notice_for)

    jobs.close(timeout_s=WAIT)
    assert running_job.done and waiting_job.done
    assert running.saw_cancel.is_set() and not waiting.started.is_set()
    with pytest.raises(RuntimeError, match="closed"):
        jobs.start(KEY, Puppet(), notice_for=notice_for)


def test_bad_settings_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="got 0"):
        ReplyJobs(max_running=0)
