"""Engine: the one object the API talks to. It owns the models, the Pipeline and the job queue.

Interrupt returns what the job has: the current image is decoded from its last step and the
remaining images are not started. Skip follows A1111: the current image stops at the next step
boundary, its partial result is kept (decoded), and the job goes on with the next image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..pipeline.generate import Pipeline
from ..pipeline.stages import StageError
from ..pipeline.tokenizer import ClipTokenizer
from ..runtime.session import ModelLoadError
from .metrics import ServiceMetrics, note_request
from .progress import ProgressControl, ProgressState
from .queue import (
    DEVICE_LOST_AFTER_FAILURES,
    ClientDisconnectedError,
    DeviceLostError,
    Job,
    JobQueue,
    NotReadyError,
    QueueFullError,
    QueueTimeoutError,
    ServiceUnavailableError,
    ShuttingDownError,
    Worker,
    looks_like_device_loss,
    new_task_id,
)

if TYPE_CHECKING:
    from ..runtime.model_dir import LoadedModels, ModelFiles
    from ..runtime.session import Session
    from ..settings import Settings
    from .capabilities import CapabilityTable
    from .options import OptionsStore
    from .request import GenerationRequest
    from .results import EncodedResult

__all__ = [
    "ClientDisconnectedError", "DeviceLostError", "Engine", "GenerationResult", "NotReadyError",
    "QueueFullError", "QueueTimeoutError", "ServiceUnavailableError", "ShuttingDownError", "StageError",
    "looks_like_device_loss", "new_task_id",
]

log = logging.getLogger(__name__)

Wrap = Callable[[str, "Session"], "Session"]
SESSION_ROLES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
DISCONNECT_POLL_S = 0.25


@dataclass
class GenerationResult:
    """What one job produced (images not yet encoded)."""

    request: GenerationRequest
    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    warnings: list[str]
    text_time_ms: float
    total_time_ms: float
    stage_ms: dict[str, float]
    job_timestamp: str
    interrupted: bool
    skipped_images: int = 0
    queue_wait_ms: float = 0.0
    task_id: str = ""
    steps_run: list[int] = field(default_factory=list)


def _stage_sums(timings_ms: dict[str, float], into: dict[str, float]) -> None:
    """Add per-image timings into per-job stage sums (per-step UNet keys are folded into `unet`)."""
    for key, ms in timings_ms.items():
        if key.startswith("unet_step"):
            continue
        stage = "unet" if key == "unet_total" else key
        into[stage] = into.get(stage, 0.0) + ms


def wrap_models(models: LoadedModels, wrap: Wrap) -> LoadedModels:
    """A copy of `models` with every session passed through `wrap(role, session)`."""
    changes = {role: wrap(role, getattr(models, role)) for role in SESSION_ROLES
               if getattr(models, role) is not None}
    return dataclasses.replace(models, **changes)


def configured_model_files(settings: Settings) -> tuple[ModelFiles, str]:
    """(ModelFiles, backend) for the configured model paths, or the demo pack with `demo`."""
    from ..runtime.demo_pack import demo_pack_dir
    from ..runtime.model_dir import resolve_model_files

    if settings.demo:
        return resolve_model_files(model_dir=demo_pack_dir(settings.cache_dir), backend="onnxruntime")
    return resolve_model_files(**settings.model_paths(), backend=settings.backend)


def load_configured_models(settings: Settings, wrap: Wrap | None = None) -> LoadedModels:
    """Resolve the model files from settings (or the demo pack) and load them."""
    from ..runtime.model_dir import load_models

    files, backend = configured_model_files(settings)
    return load_models(files, backend, device_id=settings.device_id, wrap=wrap, cache_dir=settings.cache_dir)


class Engine:
    """Models + Pipeline + queue + the NPU worker; what the HTTP layer talks to."""

    def __init__(self, settings: Settings, models: LoadedModels | None = None, wrap: Wrap | None = None):
        self.settings = settings
        self.models: LoadedModels | None = models
        self._wrap = wrap
        self.pipeline: Pipeline | None = None
        self.capabilities: CapabilityTable | None = None
        self.options: OptionsStore | None = None
        self.progress = ProgressState()
        self.metrics = ServiceMetrics()
        self.queue = JobQueue(settings.max_queue)
        self.metrics.bind_queue(lambda: self.queue.depth, lambda: 1.0 if self.progress.busy else 0.0)
        self.started_at = time.monotonic()
        self.jobs_dropped = 0            # queued jobs whose client disconnected
        self.device_lost: str | None = None
        self._worker: Worker | None = None
        self.load_error: str | None = None   # set when a background start failed
        self._shutting_down = False
        self._consecutive_failures = 0

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Load models (unless given), build Pipeline, CapabilityTable and OptionsStore, start the worker."""
        from .capabilities import CapabilityTable
        from .options import OptionsStore

        if self._worker is not None:
            return
        if self.models is None:
            self.models = load_configured_models(self.settings, self._wrap)
        elif self._wrap is not None:
            self.models = wrap_models(self.models, self._wrap)
        self.pipeline = Pipeline(self.models, ClipTokenizer.from_dir(self.models.tokenizer_dir))
        self.capabilities = CapabilityTable.from_models(self.models, self.settings)
        self.options = OptionsStore(self.settings, self.models)
        self._worker = Worker(self.queue, self._run_job)
        self._worker.start()
        log.info("engine ready: %s on %s (max_queue=%d)", self.models.model_name, self.models.backend,
                 self.settings.max_queue)

    def start_in_background(self) -> threading.Thread:
        """start() on a thread; a failure is logged and kept in `load_error` (health then says so)."""

        def load() -> None:
            try:
                self.start()
            except (ModelLoadError, OSError, ValueError) as exc:
                self.load_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ModelLoadError) \
                    else str(exc)
                log.error("cannot load the models: %s", self.load_error)

        thread = threading.Thread(target=load, name="model-load", daemon=True)
        thread.start()
        return thread

    @property
    def started(self) -> bool:
        return self._worker is not None

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def begin_shutdown(self) -> None:
        """Stop accepting; answer every queued job with 503 now. The running job continues."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self.queue.close()
        for job in self.queue.drain():
            self.metrics.reject("shutting_down")
            job.fail(ShuttingDownError("The service is shutting down; the job was not run"))
        log.info("shutting down: queued jobs answered with 503")

    def shutdown(self, timeout: float) -> None:
        """begin_shutdown, then let the running job finish (interrupted past `timeout`), stop the worker."""
        self.begin_shutdown()
        if not self.queue.wait_idle(timeout):
            log.warning("running job exceeded shutdown_timeout=%.1f s: interrupting it", timeout)
            self.progress.interrupt()
            self.queue.wait_idle(5.0)
        if self._worker is not None:
            self._worker.join(timeout=1.0)

    # --- submitting ----------------------------------------------------------------------------
    def _check_accepting(self) -> None:
        if self._shutting_down:
            raise ShuttingDownError("The service is shutting down and accepts no new jobs")
        if self.device_lost:
            raise DeviceLostError(f"The NPU is unavailable ({self.device_lost}); restart the service")
        if self.load_error:
            raise DeviceLostError(f"The models failed to load ({self.load_error})")
        if self._worker is None:
            raise NotReadyError("Models are still loading", retry_after=5)
        if not self._worker.is_alive():
            raise DeviceLostError("The NPU worker thread is not running; restart the service")

    async def submit(
        self,
        req: GenerationRequest,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> GenerationResult:
        """Queue one request and wait for its result (see design.md for the exceptions raised)."""
        try:
            self._check_accepting()
        except ServiceUnavailableError as exc:
            self.metrics.reject(_reason(exc))
            raise
        if not req.task_id:
            req.task_id = new_task_id(req.mode)
        loop = asyncio.get_running_loop()
        job = Job(request=req, task_id=req.task_id, loop=loop, future=loop.create_future())
        try:
            ahead = self.queue.put(job)
        except ServiceUnavailableError as exc:
            self.metrics.reject(_reason(exc))
            raise
        note_request(task_id=job.task_id, jobs_ahead=ahead)
        try:
            result: GenerationResult = await self._wait(job, is_disconnected)
        except asyncio.CancelledError:
            if self.queue.remove(job):
                self.metrics.reject("cancelled")
            raise
        self.metrics.generation_seconds.observe(time.monotonic() - job.enqueued_at)
        note_request(warnings=result.warnings, stage_ms={k: round(v, 1) for k, v in result.stage_ms.items()},
                     queue_wait_ms=round(result.queue_wait_ms, 1))
        return result

    async def generate(
        self,
        translate: Callable[[], GenerationRequest],
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[GenerationResult, EncodedResult]:
        """What every generation route does: translate the payload (off the event loop), apply the
        capability table, queue the job, then encode its images in this request's thread (not on the
        NPU worker)."""
        from .results import encode_result

        if self.capabilities is None:
            raise NotReadyError("Models are still loading", retry_after=5)
        req = self.capabilities.apply(await asyncio.to_thread(translate), self.options)
        result = await self.submit(req, is_disconnected=is_disconnected)
        checkpoint = self.options.checkpoint if self.options else None
        encoded = await asyncio.to_thread(
            encode_result, result, checkpoint, png_compress_level=self.settings.png_compress_level,
            output_dir=self.settings.output_dir,
        )
        return result, encoded

    async def _wait(self, job: Job, is_disconnected: Callable[[], Awaitable[bool]] | None) -> Any:
        """Await the job; while it is queued, enforce queue_timeout and drop it if the client left."""
        deadline = job.enqueued_at + self.settings.queue_timeout
        while job.started_at is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self.queue.remove(job):
                    self.metrics.reject("queue_timeout")
                    retry = self.queue.times.wait_estimate(self.queue.depth)
                    raise QueueTimeoutError(
                        f"The job waited more than queue_timeout={self.settings.queue_timeout:g} s for the "
                        "NPU; retry later or raise queue_timeout (--queue-timeout)", retry_after=retry)
                break
            done, _ = await asyncio.wait({job.future}, timeout=min(DISCONNECT_POLL_S, remaining))
            if done:
                break
            if (is_disconnected is not None and job.started_at is None and await is_disconnected()
                    and self.queue.remove(job)):
                self.jobs_dropped += 1
                self.metrics.reject("client_disconnected")
                log.info("client disconnected: dropped queued job %s", job.task_id)
                raise ClientDisconnectedError(f"client disconnected; job {job.task_id} dropped")
        return await job.future

    # --- the worker side -----------------------------------------------------------------------
    def _preview_period(self) -> int | None:
        """Steps between live previews, or None when previews are off."""
        if not self._option("live_previews_enable", self.settings.live_previews):
            return None
        every = int(self._option("show_progress_every_n_steps", self.settings.show_progress_every_n_steps))
        return every if every > 0 else None

    def _option(self, key: str, default: Any) -> Any:
        value = self.options.get(key) if self.options is not None else None
        return default if value is None else value

    def _run_job(self, job: Job) -> GenerationResult:
        """Runs on the worker thread: every image of the request, with progress and stop flags."""
        if self.device_lost:
            raise DeviceLostError(f"The NPU is unavailable ({self.device_lost}); restart the service")
        assert self.pipeline is not None and self.models is not None
        req = job.request
        wait_ms = ((job.started_at or time.monotonic()) - job.enqueued_at) * 1000.0
        self.metrics.queue_wait_seconds.observe(wait_ms / 1000.0)
        image_jobs = req.image_jobs(*self.models.image_size)
        started = time.perf_counter()
        timestamp = self.progress.begin(job.task_id, f"scripts_{req.mode}", len(image_jobs))
        images: list[Image.Image] = []
        done_jobs = []
        steps_run: list[int] = []
        warnings: list[str] = list(req.warnings)
        stage_ms: dict[str, float] = {}
        skipped = 0
        interrupted = False
        preview_every = self._preview_period()
        conditioner = self.pipeline.text_conditioner(req.emphasis)  # embeddings cached across the images
        try:
            for index, image_job in enumerate(image_jobs):
                if self.progress.is_interrupted():
                    interrupted = True
                    break
                self.progress.next_image(index, len(image_job.timesteps))
                control = ProgressControl(self.progress, self.pipeline.decode_preview, preview_every)
                output = self.pipeline.generate(image_job, control, conditioner)
                if control.preview_ms:
                    stage_ms["vae_preview"] = stage_ms.get("vae_preview", 0.0) + control.preview_ms
                if output.steps_run < len(image_job.timesteps):
                    if self.progress.is_interrupted():
                        interrupted = True
                    else:
                        skipped += 1
                images.append(output.image)
                done_jobs.append(image_job)
                steps_run.append(output.steps_run)
                _stage_sums(output.timings_ms, stage_ms)
                warnings.extend(w for w in output.warnings if w not in warnings)
            interrupted = interrupted or self.progress.is_interrupted()
        except StageError as exc:
            self._note_stage_failure(exc)
            self.metrics.jobs.labels(outcome="failed").inc()
            raise
        except Exception:
            self.metrics.jobs.labels(outcome="failed").inc()
            raise
        finally:
            self.progress.end()
        self._consecutive_failures = 0
        self.metrics.images.inc(len(images))
        self.metrics.jobs.labels(outcome="interrupted" if interrupted else "ok").inc()
        self.metrics.observe_stages(stage_ms)
        return GenerationResult(
            request=req, images=images,
            seeds=[j.seed for j in done_jobs], subseeds=[j.subseed for j in done_jobs],
            prompts=[j.prompt for j in done_jobs], negative_prompts=[j.negative_prompt for j in done_jobs],
            warnings=warnings, text_time_ms=stage_ms.get("text", 0.0),
            total_time_ms=(time.perf_counter() - started) * 1000.0, stage_ms=stage_ms,
            job_timestamp=timestamp, interrupted=interrupted, skipped_images=skipped,
            queue_wait_ms=wait_ms, task_id=job.task_id, steps_run=steps_run,
        )

    def _note_stage_failure(self, exc: StageError) -> None:
        """Count consecutive failures; declare the device lost on its error text or after N in a row."""
        self._consecutive_failures += 1
        log.error("job failed in stage %s: %s", exc.stage, exc.message)
        if looks_like_device_loss(exc.message):
            self._mark_device_lost(f"{exc.stage}: {exc.message}")
        elif self._consecutive_failures >= DEVICE_LOST_AFTER_FAILURES:
            self._mark_device_lost(f"{self._consecutive_failures} jobs in a row failed; last: {exc}")

    def _mark_device_lost(self, reason: str) -> None:
        self.device_lost = reason
        log.error("NPU marked unavailable: %s", reason)
        for job in self.queue.drain():
            self.metrics.reject("device_lost")
            job.fail(DeviceLostError(f"The NPU is unavailable ({reason}); restart the service"))

    # --- control and status --------------------------------------------------------------------
    def interrupt(self) -> None:
        self.progress.interrupt()

    def skip(self) -> None:
        self.progress.skip()

    def health(self) -> dict[str, Any]:
        """{status, backend, model, queue_depth, busy, uptime_s}; status "ok" means healthy."""
        if self._shutting_down:
            status = "shutting_down"
        elif self.device_lost:
            status = "device_lost"
        elif self.load_error:
            status = "load_failed"
        elif self._worker is None:
            status = "starting"
        elif not self._worker.is_alive():
            status = "worker_dead"
        else:
            status = "ok"
        body: dict[str, Any] = {
            "status": status,
            "backend": self.models.backend if self.models else None,
            "model": self.models.model_name if self.models else None,
            "queue_depth": self.queue.depth,
            "busy": self.progress.busy,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        }
        if self.device_lost or self.load_error:
            body["detail"] = self.device_lost or self.load_error
        return body

    def task_progress(self, id_task: str, id_live_preview: int = -1, live_preview: bool = True) -> dict:
        """The body of POST /internal/progress (A1111 shape, plus queue_position for waiting tasks)."""
        want_preview = live_preview and self._preview_period() is not None
        active = self.progress.active_view(id_task, id_live_preview, want_preview)
        if active is not None:
            return {"active": True, "queued": False, "completed": False, **active}
        position = self.queue.position(id_task)
        body: dict[str, Any] = {"active": False, "queued": position is not None,
                                "completed": self.progress.is_finished(id_task), "progress": None,
                                "eta": None, "live_preview": None, "id_live_preview": -1,
                                "textinfo": "Waiting..."}
        if position is not None:
            ahead = position + (1 if self.progress.busy else 0)
            body["eta"] = float(self.queue.times.wait_estimate(position) if ahead else 0)
            body["textinfo"] = f"In queue: {position + 1}/{self.queue.depth} ({ahead} jobs ahead)"
            body["queue_position"] = position
        return body

    def pending_tasks(self) -> list[str]:
        """Task ids waiting in the queue, oldest first (the running one is not pending)."""
        return self.queue.waiting_task_ids()


def _reason(exc: Exception) -> str:
    return {QueueFullError: "queue_full", QueueTimeoutError: "queue_timeout",
            ShuttingDownError: "shutting_down", DeviceLostError: "device_lost",
            NotReadyError: "not_ready"}.get(type(exc), type(exc).__name__)
