"""The bounded FIFO of jobs in front of the NPU worker thread(s).

HTTP handlers put jobs in (from the event loop) and await their futures; worker threads (one today,
the queue allows several) take them out in order and run them. Futures are resolved with
`loop.call_soon_threadsafe`, so a handler never blocks the loop and never touches a session.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import QueueFullError, ShuttingDownError

log = logging.getLogger(__name__)

RECENT_JOB_TIMES = 20          # jobs used for the Retry-After estimate
DEFAULT_JOB_SECONDS = 3.0      # estimate before any job ran (≈ one AX650N image)
DEVICE_LOST_AFTER_FAILURES = 3 # consecutive failed jobs (stage errors) mean the NPU is gone
DEVICE_LOST_PATTERN = re.compile(
    r"axclrt\w*\s*(?:\w+\s+)?fail|device\W.{0,24}(?:lost|removed|gone|not found|unavailable|reset)"
    r"|no (?:npu )?device|npu\W.{0,24}(?:lost|hang|reset)",
    re.IGNORECASE,
)


class PartRequeued(Exception):
    """Raised by `run_part` after `JobQueue.requeue(part)`: the part runs again on another worker
    (its device was lost under it); the job is neither failed nor finished by this attempt."""


def looks_like_device_loss(message: str) -> bool:
    """Heuristic on runtime error text: AXCLRT call failures or a device reported gone."""
    return bool(DEVICE_LOST_PATTERN.search(message))


@dataclass(eq=False)
class Job:
    """One unit of work waiting for, or running on, the NPU workers.

    `kind` tells the worker's `run_part` what `payload` is ("generate": a GenerationPlan); the queue
    itself never looks inside. A job has `parts` (a plan's images) that idle workers take one by one
    in order, so one job may run on several devices at once; `context` is what its parts share.
    A part whose device was lost under it is taken again first (`rerun`), once."""

    kind: str
    payload: Any
    task_id: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    parts: int = 1
    context: Any = None
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    failed: bool = False          # a part failed: the rest is not run and the job is not resolved
    claimed: int = 0              # parts handed to workers
    finished: int = 0             # parts returned by workers
    rerun: deque[int] = field(default_factory=deque)   # parts to run again (their device was lost)
    rerun_parts: set[int] = field(default_factory=set)  # parts that were requeued once already

    def resolve(self, result: Any) -> None:
        """Hand a result to the waiting handler (any thread)."""
        self._complete(lambda fut: fut.set_result(result))

    def fail(self, exc: BaseException) -> None:
        """Hand an exception to the waiting handler (any thread)."""
        self._complete(lambda fut: fut.set_exception(exc))

    def _complete(self, setter: Callable[[asyncio.Future], None]) -> None:
        def apply() -> None:
            if not self.future.done():
                setter(self.future)

        try:
            self.loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("job %s finished after its event loop closed", self.task_id)


class Part(NamedTuple):
    """Part `index` of `job`, as one worker takes it."""

    job: Job
    index: int


class JobTimes:
    """Durations of recent jobs, for Retry-After and ETA estimates."""

    def __init__(self, size: int = RECENT_JOB_TIMES):
        self._seconds: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.parallel = 1   # jobs that run at once (serving devices)

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds.append(seconds)

    def typical(self) -> float:
        """Median recent job time in seconds."""
        with self._lock:
            return statistics.median(self._seconds) if self._seconds else DEFAULT_JOB_SECONDS

    def wait_estimate(self, jobs_ahead: int) -> int:
        """Whole seconds until a job behind `jobs_ahead` others (plus the running ones) could start."""
        return max(1, math.ceil(self.typical() * (jobs_ahead + 1) / max(1, self.parallel)))


class JobQueue:
    """Bounded FIFO of waiting jobs; workers take the head job's parts in order, and a job leaves the
    queue when its last part is taken. Running jobs (some of their parts taken) are kept as a set."""

    def __init__(self, max_queue: int, times: JobTimes | None = None):
        self.max_queue = max_queue
        self.times = times or JobTimes()
        self._waiting: deque[Job] = deque()   # the head may be partly taken (then it is also running)
        self._running: set[Job] = set()
        self._closed = False
        self._cond = threading.Condition()

    def _not_started(self) -> list[Job]:
        return [job for job in self._waiting if job.started_at is None]

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting running ones)."""
        with self._cond:
            return len(self._not_started())

    @property
    def running(self) -> int:
        """Jobs with at least one part taken and not all parts back."""
        with self._cond:
            return len(self._running)

    def put(self, job: Job) -> int:
        """Append a job; returns how many jobs are ahead of it. Raises at once when full or closed."""
        with self._cond:
            if self._closed:
                raise ShuttingDownError("The service is shutting down and accepts no new jobs")
            waiting = len(self._not_started())
            if waiting >= self.max_queue:
                retry = self.times.wait_estimate(waiting)
                raise QueueFullError(
                    f"The NPU queue is full ({waiting} jobs waiting, max_queue="
                    f"{self.max_queue}); retry in about {retry} s or raise max_queue (--max-queue)",
                    retry_after=retry,
                )
            self._waiting.append(job)
            self._cond.notify_all()
            return waiting + len(self._running)

    def take(self, timeout: float | None = None) -> Part | None:
        """Worker side: the next part of the head job (the job is then running); None on timeout or
        when closed and empty."""
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._waiting:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            job = self._waiting[0]
            if job.started_at is None:
                job.started_at = time.monotonic()
                self._running.add(job)
            if job.rerun:
                part = Part(job, job.rerun.popleft())
            else:
                part = Part(job, job.claimed)
                job.claimed += 1
            if job.claimed >= job.parts and not job.rerun:
                self._waiting.popleft()
            return part

    def requeue(self, part: Part) -> bool:
        """Worker side: run `part` again on the next free worker (before any other job: it was
        already running); False when it was requeued once already or its job failed."""
        job = part.job
        with self._cond:
            if job.failed or part.index in job.rerun_parts:
                return False
            job.rerun_parts.add(part.index)
            job.rerun.append(part.index)
            if job not in self._waiting:
                self._waiting.appendleft(job)
            self._cond.notify_all()
            return True

    def done(self, part: Part) -> bool:
        """Worker side: a part came back; True when it was the job's last one out."""
        job = part.job
        with self._cond:
            job.finished += 1
            last = job.finished >= job.claimed and (job.claimed >= job.parts or job.failed)
            if last and job in self._running:
                self._running.discard(job)
                if job.started_at is not None:
                    self.times.add(time.monotonic() - job.started_at)
            self._cond.notify_all()
            return last

    def abandon(self, job: Job) -> None:
        """A part failed: its parts not yet taken are dropped (the job is answered with the failure)."""
        with self._cond:
            job.failed = True
            if job in self._waiting:
                self._waiting.remove(job)
            if job.finished >= job.claimed:
                self._running.discard(job)
            self._cond.notify_all()

    def remove(self, job: Job) -> bool:
        """Take a waiting job out (timeout, disconnect); False when it already started."""
        with self._cond:
            if job.started_at is not None or job not in self._waiting:
                return False
            self._waiting.remove(job)
            return True

    def drain(self, started_too: bool = False) -> list[Job]:
        """Remove and return every waiting job (with `started_too`, also a partly taken head job)."""
        with self._cond:
            jobs = [job for job in self._waiting if started_too or job.started_at is None]
            for job in jobs:
                self._waiting.remove(job)
            return jobs

    def close(self) -> None:
        """Refuse new jobs and wake the workers so they can exit once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def waiting_task_ids(self) -> list[str]:
        with self._cond:
            return [job.task_id for job in self._not_started()]

    def position(self, task_id: str) -> int | None:
        """0-based index of a waiting task in the queue, or None."""
        with self._cond:
            for index, job in enumerate(self._not_started()):
                if job.task_id == task_id:
                    return index
            return None

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


class Worker(threading.Thread):
    """A thread that takes parts from the queue and runs them with `run_part` (which owns one device's
    sessions); the worker that returns a job's last part resolves it with `finish(job)`.

    `setup` runs first on this thread (loading a device's models binds them to it); the worker then
    waits for `go` before taking anything. It stops when the queue is closed and empty, or after the
    part during which `stop()` was called (a lost device).

    `idle`, when given, is background work done in small slices while no job waits: it is called
    whenever the queue is empty and returns True while more remains, so a job submitted meanwhile
    waits at most one slice. Once it returns False the worker blocks on the queue."""

    def __init__(self, queue: JobQueue, run_part: Callable[[Part], Any],
                 finish: Callable[[Job], Any] | None = None, name: str = "npu-worker",
                 setup: Callable[[], None] | None = None, go: threading.Event | None = None,
                 idle: Callable[[], bool] | None = None):
        super().__init__(name=name, daemon=True)
        self.queue = queue
        self.run_part = run_part
        self.finish = finish
        self.setup = setup
        self.go = go
        self.idle = idle
        self._stop_requested = False

    def stop(self) -> None:
        """Take no more parts (the one running completes)."""
        self._stop_requested = True

    def run(self) -> None:
        if self.setup is not None and not self._setup_ok():
            return
        if self.go is not None:
            self.go.wait()
        idle_work = self.idle is not None
        while not self._stop_requested:
            part = self.queue.take(timeout=0 if idle_work else None)
            if part is None:
                if self.queue.closed or not idle_work:
                    return
                idle_work = self._idle_slice()
                continue
            self._run(part)

    def _idle_slice(self) -> bool:
        """One slice of idle work; True while more remains (a failure ends the idle work, logged)."""
        assert self.idle is not None
        try:
            return bool(self.idle())
        except Exception:  # noqa: BLE001 - background work never stops the worker
            log.exception("idle work failed; stopped")
            return False

    def _setup_ok(self) -> bool:
        try:
            assert self.setup is not None
            self.setup()
        except Exception:  # noqa: BLE001 - the setup reports its own failure
            return False
        return True

    def _run(self, part: Part) -> None:
        job = part.job
        value: Any = None
        try:
            value = self.run_part(part)
        except PartRequeued:   # another worker runs it: this attempt neither fails nor ends the job
            return
        except Exception as exc:  # noqa: BLE001 - one failed job never stops the worker
            self.queue.abandon(job)
            job.fail(exc)
        if self.queue.done(part) and not job.failed:
            try:
                job.resolve(self.finish(job) if self.finish is not None else value)
            except Exception as exc:  # noqa: BLE001
                job.fail(exc)
