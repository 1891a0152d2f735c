"""Replies as server-side jobs, so a reload, a dropped connection or a second tab loses nothing.

A streamed reply used to live inside one Gradio event: when the connection went, so did the reply.
Here a reply is a `ReplyJob` keyed by (owner id, conversation id). The job owns the cancel event and
the text so far; Stop, a reload and a second tab all talk to the job, never to a connection. A page
re-attaches with `job.listen()`: it gets the text so far at once, then the live stream, to the end.

A job stops on Stop (`ReplyJobs.cancel`), when nobody has listened for `grace_s` (the page is gone
for good), or on `ReplyJobs.close`. Stopping only sets `job.cancel`: the work is expected to check
it (the model's stream stops within a token). A finished job is kept for `grace_s` so that a reload
right at the end still sees the final text and notice.

Locks: a registry method may take a job's lock while holding the registry's, never the reverse.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ReplyKey = tuple[int, str]
"""(owner id, conversation id): at most one reply is written per conversation at a time."""


@dataclass(frozen=True)
class ReplySnapshot:
    """What a listener sees of a job at one moment."""

    text: str
    """Everything generated so far."""
    message_id: int | None
    """The stored reply's id, once the work reports it."""
    waiting: bool
    """Still waiting for a free generation slot."""
    done: bool
    """The job ended: this is the last snapshot a listener sees."""
    notice: str | None
    """A sentence for the person when the job ended with a failure."""
    outcome: Any
    """Whatever the work returned (None until done, or when it failed or never ran)."""


class ReplyAlreadyRunningError(Exception):
    """A reply was asked for in a conversation that is still being answered."""

    def __init__(self, key: ReplyKey) -> None:
        super().__init__("A reply is still being written in this conversation; wait for it or press Stop.")
        self.key = key


class ReplyQueueFullError(Exception):
    """Too many replies are waiting for a turn of the model; try again later."""

    def __init__(self) -> None:
        super().__init__("The model is busy with other replies and the queue is full; try again in a minute.")


class ReplyJob:
    """One reply being written: its text so far, its listeners and its cancel event.

    The work publishes from its own thread and listeners read from theirs; all state sits under
    one condition, which listeners wait on.
    """

    def __init__(self, key: ReplyKey, *, clock: Callable[[], float] = time.monotonic,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.key = key
        self.cancel = threading.Event()
        self._clock = clock
        self._on_idle = on_idle
        self._cond = threading.Condition()
        self._state = ReplySnapshot(text="", message_id=None, waiting=True, done=False, notice=None, outcome=None)
        self._version = 0
        self._listeners = 0
        self._idle_from: float | None = clock()
        self._ended_at: float | None = None

    @property
    def done(self) -> bool:
        with self._cond:
            return self._state.done

    def snapshot(self) -> ReplySnapshot:
        with self._cond:
            return self._state

    def publish(self, text: str, *, message_id: int | None = None) -> None:
        """Replace the text so far with `text` (the whole text, not a delta). Called by the work."""
        if message_id is None:
            self._update(text=text)
        else:
            self._update(text=text, message_id=message_id)

    def listen(self, *, min_interval_s: float = 0.05, timeout_s: float | None = None) -> Iterator[ReplySnapshot]:
        """Yield the current snapshot at once, then the newest one after each change, until done.

        Bursts are coalesced: snapshots come no more often than every `min_interval_s`, except
        that the final done snapshot comes as soon as the job ends and is never skipped. With
        `timeout_s`, the iterator ends early (without a done snapshot) once nothing has changed
        for that long. The iterator counts as a listener while it is open; closing it early lets
        the grace period start.
        """
        self._attach()
        try:
            seen = -1
            not_before = 0.0
            while (change := self._next_change(seen, not_before=not_before, timeout_s=timeout_s)) is not None:
                snapshot, seen = change
                not_before = time.monotonic() + min_interval_s
                yield snapshot
                if snapshot.done:
                    return
        finally:
            self._detach()

    def _next_change(self, seen: int, *, not_before: float,
                     timeout_s: float | None) -> tuple[ReplySnapshot, int] | None:
        """The newest snapshot and its version once it is newer than `seen`; None after `timeout_s` unchanged.

        Waits until `not_before` (a `time.monotonic()` time) first, unless the job ends meanwhile.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._state.done, timeout=max(0.0, not_before - time.monotonic()))
            if not self._cond.wait_for(lambda: self._version != seen, timeout=timeout_s):
                return None
            return self._state, self._version

    def _update(self, **changes: Any) -> None:
        with self._cond:
            if self._state.done:
                log.debug("reply %s: ignored a change after it ended", self.key)
                return
            self._state = dataclasses.replace(self._state, **changes)
            self._version += 1
            if self._state.done:
                self._ended_at = self._clock()
            self._cond.notify_all()

    def _begin(self) -> None:
        self._update(waiting=False)

    def _finish(self, *, outcome: Any, notice: str | None) -> None:
        self._update(waiting=False, done=True, outcome=outcome, notice=notice)

    def _attach(self) -> None:
        with self._cond:
            self._listeners += 1
            self._idle_from = None

    def _detach(self) -> None:
        with self._cond:
            self._listeners -= 1
            idle = self._listeners == 0
            if idle:
                self._idle_from = self._clock()
        if idle and self._on_idle is not None:
            self._on_idle()

    def _quiet_since(self) -> float | None:
        """When the job ended, else when its last listener left (or it started); None while someone listens."""
        with self._cond:
            return self._ended_at if self._state.done else self._idle_from


class ReplyJobs:
    """The replies being written, by (owner id, conversation id), with at most `max_running` at once.

    `clock` measures the grace period (inject one in tests); the watchdog thread looks at least
    every `check_every_s` seconds, so an injected clock that jumps is noticed that quickly.
    """

    def __init__(self, *, max_running: int, grace_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 check_every_s: float = 1.0) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        if grace_s <= 0 or check_every_s <= 0:
            raise ValueError(f"grace_s and check_every_s must be positive, got {grace_s} and {check_every_s}")
        self._max_running = max_running
        self._grace_s = grace_s
        self._clock = clock
        self._check_every_s = check_every_s
        self._cond = threading.Condition()
        self._jobs: dict[ReplyKey, ReplyJob] = {}
        self._line: deque[ReplyJob] = deque()
        self._running = 0
        self._threads: set[threading.Thread] = set()
        self._watchdog: threading.Thread | None = None
        self._closed = False

    def start(self, key: ReplyKey, work: Callable[[ReplyJob], Any], *,
              notice_for: Callable[[BaseException], str], max_waiting: int | None = None) -> ReplyJob:
        """Run `work(job)` on a daemon thread once a slot is free; its return value becomes the outcome.

        An exception from the work is logged with its traceback and ends the job with
        `notice_for(exception)` as the notice; `notice_for` must not raise. A finished job for
        `key` is replaced; a running one raises `ReplyAlreadyRunningError`. With `max_waiting`,
        a job that would have to wait behind that many others raises `ReplyQueueFullError`.
        """
        job = ReplyJob(key, clock=self._clock, on_idle=self._wake)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"reply jobs are closed; cannot start a reply for {key}")
            current = self._jobs.get(key)
            if current is not None and not current.done:
                raise ReplyAlreadyRunningError(key)
            if max_waiting is not None and len(self._line) >= max_waiting \
                    and self._running + len(self._line) >= self._max_running:
                raise ReplyQueueFullError()
            self._jobs[key] = job
            self._line.append(job)
            thread = threading.Thread(target=self._run, args=(job, work, notice_for),
                                      name=f"reply-{key[0]}-{key[1]}", daemon=True)
            self._threads.add(thread)
            thread.start()
            self._ensure_watchdog()
            self._cond.notify_all()
        return job

    def get(self, key: ReplyKey) -> ReplyJob | None:
        """The running job for `key`, or the finished one for `grace_s` after it ended; else None."""
        with self._cond:
            job = self._jobs.get(key)
            if job is not None and job.done and self._expired(job, now=self._clock()):
                del self._jobs[key]
                return None
            return job

    def running(self, key: ReplyKey) -> bool:
        with self._cond:
            job = self._jobs.get(key)
            return job is not None and not job.done

    def cancel(self, key: ReplyKey) -> bool:
        """Ask the running job for `key` to stop (Stop was pressed); False when none is running."""
        with self._cond:
            job = self._jobs.get(key)
            if job is None or job.done:
                return False
            log.info("reply %s: stop asked for", key)
            job.cancel.set()
            self._cond.notify_all()
            return True

    def close(self, *, timeout_s: float = 10.0) -> None:
        """Cancel every job and wait up to `timeout_s` in all for their threads and the watchdog."""
        with self._cond:
            self._closed = True
            for job in self._jobs.values():
                job.cancel.set()
            threads = [*self._threads, *([self._watchdog] if self._watchdog is not None else [])]
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if alive := [thread.name for thread in threads if thread.is_alive()]:
            log.warning("reply threads still running %.1f s after close: %s", timeout_s, ", ".join(alive))

    def _run(self, job: ReplyJob, work: Callable[[ReplyJob], Any], notice_for: Callable[[BaseException], str]) -> None:
        try:
            if self._take_slot(job):
                self._work(job, work, notice_for)
            else:
                log.info("reply %s: stopped before it started", job.key)
                job._finish(outcome=None, notice=None)
        finally:
            with self._cond:
                self._threads.discard(threading.current_thread())

    def _work(self, job: ReplyJob, work: Callable[[ReplyJob], Any], notice_for: Callable[[BaseException], str]) -> None:
        outcome, notice = None, None
        try:
            outcome = work(job)
        except Exception as error:  # the failure ends this job only; the cause goes to the log
            log.exception("reply %s failed", job.key)
            notice = notice_for(error)
        finally:
            job._finish(outcome=outcome, notice=notice)
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _take_slot(self, job: ReplyJob) -> bool:
        """Wait in line for a free slot; False when the job is cancelled first (it then leaves the line)."""
        with self._cond:
            while not job.cancel.is_set() and not (self._line[0] is job and self._running < self._max_running):
                self._cond.wait(self._check_every_s)  # a cancel set directly on the job does not notify
            self._line.remove(job)
            self._cond.notify_all()
            if job.cancel.is_set():
                return False
            self._running += 1
        job._begin()
        return True

    def _wake(self) -> None:
        """A job lost its last listener: the watchdog recomputes its next deadline."""
        with self._cond:
            self._cond.notify_all()

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="reply-watchdog", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                self._cond.wait(self._sweep())

    def _sweep(self) -> float | None:
        """Cancel jobs nobody listened to for `grace_s`, drop jobs finished that long ago.

        Returns the seconds until the next look, or None when there is no job to watch. Called
        with the registry lock held.
        """
        now = self._clock()
        for key, job in list(self._jobs.items()):
            if not self._expired(job, now=now):
                continue
            if job.done:
                del self._jobs[key]
            elif not job.cancel.is_set():
                log.info("reply %s: nobody listened for %.1f s; stopping it", key, self._grace_s)
                job.cancel.set()
                self._cond.notify_all()
        if not self._jobs:
            return None
        deadlines = [since + self._grace_s for job in self._jobs.values() if (since := job._quiet_since()) is not None]
        return min([self._check_every_s, *(deadline - now for deadline in deadlines if deadline > now)])

    def _expired(self, job: ReplyJob, *, now: float) -> bool:
        since = job._quiet_since()
        return since is not None and now >= since + self._grace_s
