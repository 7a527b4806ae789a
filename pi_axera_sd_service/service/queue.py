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
from typing import Any

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


def looks_like_device_loss(message: str) -> bool:
    """Heuristic on runtime error text: AXCLRT call failures or a device reported gone."""
    return bool(DEVICE_LOST_PATTERN.search(message))


@dataclass(eq=False)
class Job:
    """One unit of work waiting for, or running on, an NPU worker.

    `kind` tells the worker's `run_job` what `payload` is ("generate": a GenerationPlan); the queue
    itself never looks inside."""

    kind: str
    payload: Any
    task_id: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None

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


class JobTimes:
    """Durations of recent jobs, for Retry-After and ETA estimates."""

    def __init__(self, size: int = RECENT_JOB_TIMES):
        self._seconds: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds.append(seconds)

    def typical(self) -> float:
        """Median recent job time in seconds."""
        with self._lock:
            return statistics.median(self._seconds) if self._seconds else DEFAULT_JOB_SECONDS

    def wait_estimate(self, jobs_ahead: int) -> int:
        """Whole seconds until a job behind `jobs_ahead` others (plus the running one) could start."""
        return max(1, math.ceil(self.typical() * (jobs_ahead + 1)))


class JobQueue:
    """Bounded FIFO of waiting jobs; the running ones (one per worker) are tracked separately."""

    def __init__(self, max_queue: int, times: JobTimes | None = None):
        self.max_queue = max_queue
        self.times = times or JobTimes()
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()
        self._closed = False
        self._cond = threading.Condition()

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the running one)."""
        with self._cond:
            return len(self._waiting)

    def put(self, job: Job) -> int:
        """Append a job; returns how many jobs are ahead of it. Raises at once when full or closed."""
        with self._cond:
            if self._closed:
                raise ShuttingDownError("The service is shutting down and accepts no new jobs")
            if len(self._waiting) >= self.max_queue:
                retry = self.times.wait_estimate(len(self._waiting))
                raise QueueFullError(
                    f"The NPU queue is full ({len(self._waiting)} jobs waiting, max_queue="
                    f"{self.max_queue}); retry in about {retry} s or raise max_queue (--max-queue)",
                    retry_after=retry,
                )
            self._waiting.append(job)
            ahead = len(self._waiting) - 1 + len(self._running)
            self._cond.notify_all()
            return ahead

    def take(self, timeout: float | None = None) -> Job | None:
        """Worker side: the next job, now marked running; None on timeout or when closed."""
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._waiting:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            job = self._waiting.popleft()
            job.started_at = time.monotonic()
            self._running.add(job)
            return job

    def done(self, job: Job) -> None:
        """Worker side: the running job finished."""
        with self._cond:
            if job in self._running:
                self._running.discard(job)
                if job.started_at is not None:
                    self.times.add(time.monotonic() - job.started_at)
            self._cond.notify_all()

    def remove(self, job: Job) -> bool:
        """Take a waiting job out (timeout, disconnect); False when it already started."""
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return False
            return True

    def drain(self) -> list[Job]:
        """Remove and return every waiting job."""
        with self._cond:
            jobs = list(self._waiting)
            self._waiting.clear()
            return jobs

    def close(self) -> None:
        """Refuse new jobs and wake the worker so it can exit once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def waiting_task_ids(self) -> list[str]:
        with self._cond:
            return [job.task_id for job in self._waiting]

    def position(self, task_id: str) -> int | None:
        """0-based index of a waiting task in the queue, or None."""
        with self._cond:
            for index, job in enumerate(self._waiting):
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
    """A thread that takes jobs from the queue and runs them with `run_job` (which owns the NPU sessions).

    `idle`, when given, is background work done in small slices while no job waits: it is called
    whenever the queue is empty and returns True while more remains, so a job submitted meanwhile
    waits at most one slice. Once it returns False the worker blocks on the queue as before.
    """

    def __init__(self, queue: JobQueue, run_job: Callable[[Job], Any], name: str = "npu-worker",
                 idle: Callable[[], bool] | None = None):
        super().__init__(name=name, daemon=True)
        self.queue = queue
        self.run_job = run_job
        self.idle = idle

    def run(self) -> None:
        idle_work = self.idle is not None
        while True:
            job = self.queue.take(timeout=0 if idle_work else None)
            if job is None:
                if self.queue.closed:
                    return
                idle_work = self._idle_slice()
                continue
            try:
                job.resolve(self.run_job(job))
            except Exception as exc:  # noqa: BLE001 - one failed job never stops the worker
                job.fail(exc)
            finally:
                self.queue.done(job)

    def _idle_slice(self) -> bool:
        """One slice of idle work; True while more remains (a failure ends the idle work, logged)."""
        assert self.idle is not None
        try:
            return bool(self.idle())
        except Exception:  # noqa: BLE001 - background work never stops the worker
            log.exception("idle work failed; stopped")
            return False
