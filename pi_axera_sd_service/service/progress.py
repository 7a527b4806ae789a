"""Progress of the running job with A1111 `shared.state` semantics, plus per-task bookkeeping.

The worker thread writes; request handlers read snapshots. Every method takes one lock and does
no model work, so `/sdapi/v1/progress` answers at once even while the NPU is busy. Preview images
are stored as PIL images and encoded lazily, in the reader's thread.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

FINISHED_TASKS_KEPT = 64
PROGRESS_FLOOR = 0.01   # A1111 starts busy progress at 0.01 so that "busy" never reads as 0
INTERROGATE_JOB = "interrogate"   # `job` while an interrogation runs (generation: scripts_<mode>)


def encode_png_b64(image: Image.Image) -> str:
    """A preview as base64 PNG (fast, level 1)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ProgressState:
    """What the worker is doing now; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finished: deque[str] = deque(maxlen=FINISHED_TASKS_KEPT)
        self._reset()

    def _reset(self) -> None:
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.job_timestamp = "0"
        self.sampling_step = 0
        self.sampling_steps = 0
        self.skipped = False
        self.interrupted = False
        self.textinfo: str | None = None
        self.time_start = 0.0
        self.task_id: str | None = None
        self._preview: Image.Image | None = None
        self._preview_b64: str | None = None
        self.id_live_preview = 0

    # --- worker side ---------------------------------------------------------------------------
    def begin(self, task_id: str, job: str, job_count: int) -> str:
        """A job starts; returns its job_timestamp (%Y%m%d%H%M%S)."""
        with self._lock:
            self._reset()
            self.task_id = task_id
            self.job = job
            self.job_count = job_count
            self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            self.time_start = time.time()
            self.textinfo = f"Image 1 out of {job_count}"
            return self.job_timestamp

    def next_image(self, job_no: int, steps: int) -> None:
        """Image `job_no` (0-based) of the job starts; a pending skip is cleared as in A1111."""
        with self._lock:
            self.job_no = job_no
            self.sampling_step = 0
            self.sampling_steps = steps
            self.skipped = False
            self.textinfo = f"Image {job_no + 1} out of {self.job_count}"

    def step(self, step: int, steps: int) -> None:
        with self._lock:
            self.sampling_step = step
            self.sampling_steps = steps

    def set_preview(self, image: Image.Image) -> None:
        with self._lock:
            self._preview = image
            self._preview_b64 = None
            self.id_live_preview += 1

    def end(self) -> None:
        """The job finished (or failed); back to the idle shape."""
        with self._lock:
            if self.task_id is not None:
                self._finished.append(self.task_id)
            self._reset()

    # --- control -------------------------------------------------------------------------------
    def interrupt(self) -> bool:
        """Stop the running job at the next step boundary; False when idle."""
        with self._lock:
            if not self.job:
                return False
            self.interrupted = True
            return True

    def skip(self) -> bool:
        """Stop the current image at the next step boundary and go on with the next one."""
        with self._lock:
            if not self.job:
                return False
            self.skipped = True
            return True

    def should_stop(self) -> bool:
        with self._lock:
            return self.interrupted or self.skipped

    def is_interrupted(self) -> bool:
        with self._lock:
            return self.interrupted

    # --- readers -------------------------------------------------------------------------------
    def _fraction(self) -> float:
        """A1111's per-task progress (no floor): job_no/job_count + step share."""
        if self.job_count <= 0:
            return 0.0
        value = self.job_no / self.job_count
        if self.sampling_steps > 0:
            value += (1 / self.job_count) * self.sampling_step / self.sampling_steps
        return min(value, 1.0)

    def _encoded_preview(self) -> str | None:
        """The current preview as base64 PNG; encoded outside the lock (the worker never waits on it)."""
        with self._lock:
            image, encoded, preview_id = self._preview, self._preview_b64, self.id_live_preview
        if image is None or encoded is not None:
            return encoded
        encoded = encode_png_b64(image)
        with self._lock:
            if self.id_live_preview == preview_id:
                self._preview_b64 = encoded
        return encoded

    def snapshot(self, skip_current_image: bool = False) -> dict[str, Any]:
        """The body of GET /sdapi/v1/progress."""
        with self._lock:
            state = {
                "skipped": self.skipped,
                "interrupted": self.interrupted,
                "job": self.job,
                "job_count": self.job_count,
                "job_timestamp": self.job_timestamp,
                "job_no": self.job_no,
                "sampling_step": self.sampling_step,
                "sampling_steps": self.sampling_steps,
            }
            if self.job_count == 0:
                return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None,
                        "textinfo": self.textinfo}
            progress = PROGRESS_FLOOR + self._fraction()
            elapsed = time.time() - self.time_start
            eta_relative = max(0.0, elapsed / progress - elapsed)
            textinfo = self.textinfo
        image = None if skip_current_image else self._encoded_preview()
        return {"progress": min(progress, 1.0), "eta_relative": eta_relative, "state": state,
                "current_image": image, "textinfo": textinfo}

    def active_view(self, task_id: str, id_live_preview: int, want_preview: bool) -> dict[str, Any] | None:
        """/internal/progress fields for the running task, or None when `task_id` is not running."""
        with self._lock:
            if not self.job or self.task_id != task_id:
                return None
            progress = self._fraction()
            elapsed = time.time() - self.time_start
            eta = elapsed / progress - elapsed if progress > 0 else None
            current_id, textinfo = self.id_live_preview, self.textinfo
        live_preview = None
        preview_id = id_live_preview
        if want_preview and current_id != id_live_preview:
            encoded = self._encoded_preview()
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
            return bool(self.job)


class ProgressControl:
    """The pipeline's JobControl for one image: reports steps, honours interrupt/skip, and decodes
    a live preview of x0 every `preview_every` steps (None: off; the final step is never previewed)."""

    def __init__(self, state: ProgressState, decode_preview: Callable[[np.ndarray], Image.Image],
                 preview_every: int | None):
        self.state = state
        self.decode_preview = decode_preview
        self.preview_every = preview_every
        self.preview_ms = 0.0

    def on_step(self, step: int, steps: int, x0: np.ndarray | None) -> None:
        self.state.step(step, steps)
        every = self.preview_every
        if every and x0 is not None and step < steps and step % every == 0:
            start = time.perf_counter()
            self.state.set_preview(self.decode_preview(x0))
            self.preview_ms += (time.perf_counter() - start) * 1000.0

    def should_stop(self) -> bool:
        return self.state.should_stop()
