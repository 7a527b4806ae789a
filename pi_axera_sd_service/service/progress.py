"""Progress of the running tasks with A1111 `shared.state` semantics, kept per task.

The worker threads write (one per device; a task's images may run on several at once); request
handlers read snapshots. Every method takes one lock and does
no model work, so `/sdapi/v1/progress` answers at once even while the NPU is busy. Preview images
are stored as PIL images and encoded lazily, in the reader's thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ..pipeline.images import b64encode_text, encode_image

FINISHED_TASKS_KEPT = 64
PROGRESS_FLOOR = 0.01   # A1111 starts busy progress at 0.01 so that "busy" never reads as 0
INTERROGATE_JOB = "interrogate"   # `job` while an interrogation runs (generation: scripts_<mode>)


def encode_png_b64(image: Image.Image) -> str:
    """A preview as base64 PNG (fast, level 1)."""
    return b64encode_text(encode_image(image, "png", png_compress_level=1))


class TaskProgress:
    """One running task: its images in flight (one per device at most), interrupt/skip, preview."""

    def __init__(self, task_id: str, job: str, job_count: int):
        self.task_id = task_id
        self.job = job
        self.job_count = job_count
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
        self.time_start = time.time()
        self.images_done = 0
        self.running: dict[int, list[int]] = {}     # image index -> [step, steps]
        self.last: tuple[int, int, int] = (0, 0, 0)  # (index, step, steps) of the latest image shown
        self.skip_images: set[int] = set()
        self.interrupted = False
        self.preview: Image.Image | None = None
        self.preview_b64: str | None = None
        self.id_live_preview = 0

    def shown_image(self) -> tuple[int, int, int]:
        """(job_no, sampling_step, sampling_steps): the lowest image in flight, else the last one."""
        if self.running:
            index = min(self.running)
            step, steps = self.running[index]
            return index, step, steps
        return self.last

    def fraction(self) -> float:
        """A1111's per-task progress (no floor): finished images plus the step share of those in flight."""
        if self.job_count <= 0:
            return 0.0
        value = self.images_done + sum(step / steps for step, steps in self.running.values() if steps > 0)
        return min(value / self.job_count, 1.0)

    def textinfo(self) -> str:
        return f"Image {self.shown_image()[0] + 1} out of {self.job_count}"


class ProgressState:
    """What the workers are doing now, per task; thread-safe.

    Several tasks run at once when there are several devices. The A1111 views (/sdapi/v1/progress,
    /interrupt, /skip), which know no task id, act on the *current* task: the oldest one running.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finished: deque[str] = deque(maxlen=FINISHED_TASKS_KEPT)
        self._tasks: dict[str, TaskProgress] = {}   # running tasks, oldest first

    def _current(self) -> TaskProgress | None:
        return next(iter(self._tasks.values()), None)

    # --- worker side ---------------------------------------------------------------------------
    def begin(self, task_id: str, job: str, job_count: int) -> str:
        """A task starts; returns its job_timestamp (%Y%m%d%H%M%S)."""
        with self._lock:
            task = self._tasks.setdefault(task_id, TaskProgress(task_id, job, job_count))
            return task.job_timestamp

    def next_image(self, task_id: str, index: int, steps: int) -> None:
        """Image `index` (0-based) of the task starts; a pending skip of it is cleared as in A1111."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                task.running[index] = [0, steps]
                task.last = (index, 0, steps)
                task.skip_images.discard(index)

    def step(self, task_id: str, index: int, step: int, steps: int) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None and index in task.running:
                task.running[index] = [step, steps]
                task.last = (index, step, steps)

    def image_done(self, task_id: str, index: int) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None and task.running.pop(index, None) is not None:
                task.images_done += 1

    def set_preview(self, task_id: str, image: Image.Image) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                task.preview = image
                task.preview_b64 = None
                task.id_live_preview += 1

    def end(self, task_id: str) -> None:
        """The task finished (or failed); it is no longer shown."""
        with self._lock:
            if self._tasks.pop(task_id, None) is not None:
                self._finished.append(task_id)

    # --- control -------------------------------------------------------------------------------
    def interrupt(self, every_task: bool = False) -> bool:
        """Stop the current task (or every running one) at the next step boundary; False when idle."""
        with self._lock:
            tasks = list(self._tasks.values()) if every_task else list(self._tasks.values())[:1]
            for task in tasks:
                task.interrupted = True
            return bool(tasks)

    def skip(self) -> bool:
        """Stop the current task's images in flight at the next step boundary; the task goes on."""
        with self._lock:
            task = self._current()
            if task is None:
                return False
            task.skip_images.update(task.running or {task.shown_image()[0]: None})
            return True

    def should_stop(self, task_id: str, index: int) -> bool:
        """Interrupted, skipped, or no longer running (failed elsewhere)."""
        with self._lock:
            task = self._tasks.get(task_id)
            return task is None or task.interrupted or index in task.skip_images

    def is_interrupted(self, task_id: str) -> bool:
        with self._lock:
            task = self._tasks.get(task_id)
            return task is None or task.interrupted

    # --- readers -------------------------------------------------------------------------------
    def _encoded_preview(self, task: TaskProgress) -> str | None:
        """The task's preview as base64 PNG; encoded outside the lock (the worker never waits on it)."""
        with self._lock:
            image, encoded, preview_id = task.preview, task.preview_b64, task.id_live_preview
        if image is None or encoded is not None:
            return encoded
        encoded = encode_png_b64(image)
        with self._lock:
            if task.id_live_preview == preview_id:
                task.preview_b64 = encoded
        return encoded

    def snapshot(self, skip_current_image: bool = False) -> dict[str, Any]:
        """The body of GET /sdapi/v1/progress (the current task)."""
        with self._lock:
            task = self._current()
            if task is None:
                state = {"skipped": False, "interrupted": False, "job": "", "job_count": 0,
                         "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
                return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None,
                        "textinfo": None}
            job_no, step, steps = task.shown_image()
            state = {
                "skipped": bool(task.skip_images & (task.running.keys() or {job_no})),
                "interrupted": task.interrupted,
                "job": task.job,
                "job_count": task.job_count,
                "job_timestamp": task.job_timestamp,
                "job_no": job_no,
                "sampling_step": step,
                "sampling_steps": steps,
            }
            progress = PROGRESS_FLOOR + task.fraction()
            elapsed = time.time() - task.time_start
            eta_relative = max(0.0, elapsed / progress - elapsed)
            textinfo = task.textinfo()
        image = None if skip_current_image else self._encoded_preview(task)
        return {"progress": min(progress, 1.0), "eta_relative": eta_relative, "state": state,
                "current_image": image, "textinfo": textinfo}

    def active_view(self, task_id: str, id_live_preview: int, want_preview: bool) -> dict[str, Any] | None:
        """/internal/progress fields for a running task, or None when `task_id` is not running."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return None
            progress = task.fraction()
            elapsed = time.time() - task.time_start
            eta = elapsed / progress - elapsed if progress > 0 else None
            current_id, textinfo = task.id_live_preview, task.textinfo()
        live_preview = None
        preview_id = id_live_preview
        if want_preview and current_id != id_live_preview:
            encoded = self._encoded_preview(task)
            if encoded is not None:
                live_preview = "data:image/png;base64," + encoded
                preview_id = current_id
        return {"progress": progress, "eta": eta, "live_preview": live_preview,
                "id_live_preview": preview_id, "textinfo": textinfo}

    def is_finished(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._finished

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._tasks)

    @property
    def sampling_step(self) -> int:
        """The current task's shown step (0 when idle)."""
        with self._lock:
            task = self._current()
            return task.shown_image()[1] if task is not None else 0


class ProgressControl:
    """The pipeline's JobControl for one image of one task: reports steps, honours interrupt/skip,
    and decodes a live preview of x0 every `preview_every` steps (None: off; never the final step)."""

    def __init__(self, state: ProgressState, task_id: str, index: int,
                 decode_preview: Callable[[np.ndarray], Image.Image], preview_every: int | None):
        self.state = state
        self.task_id = task_id
        self.index = index
        self.decode_preview = decode_preview
        self.preview_every = preview_every
        self.preview_ms = 0.0

    def on_step(self, step: int, steps: int, x0: np.ndarray | None) -> None:
        self.state.step(self.task_id, self.index, step, steps)
        every = self.preview_every
        if every and x0 is not None and step < steps and step % every == 0:
            start = time.perf_counter()
            self.state.set_preview(self.task_id, self.decode_preview(x0))
            self.preview_ms += (time.perf_counter() - start) * 1000.0

    def should_stop(self) -> bool:
        return self.state.should_stop(self.task_id, self.index)
