"""Engine: the one object the API (and its dependencies) talks to. It owns the models, the
Pipeline, the capability table, the options and the job queue.

The request's way: translate (route) -> CapabilityTable.apply -> GenerationPlan -> queue -> worker
(JobRunner: Pipeline) -> encode_result. What the NPU worker does with a plan is in runner.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..pipeline.stages import StageError
from ..runtime.session import ModelLoadError
from .errors import (
    ClientDisconnectedError,
    DeviceLostError,
    NotReadyError,
    QueueFullError,
    QueueTimeoutError,
    ServiceUnavailableError,
    ShuttingDownError,
)
from .metrics import ServiceMetrics, note_request
from .progress import INTERROGATE_JOB, ProgressState
from .queue import DEVICE_LOST_AFTER_FAILURES, Job, JobQueue, Worker, looks_like_device_loss
from .runner import GenerationResult, JobRunner

if TYPE_CHECKING:
    from ..runtime.model_dir import LoadedModels, ModelFiles, Wrap
    from ..settings import Settings
    from .capabilities import CapabilityTable
    from .interrogation import InterrogationService
    from .options import OptionsStore
    from .plan import GenerationPlan
    from .request import GenerationRequest
    from .results import EncodedResult

log = logging.getLogger(__name__)

SESSION_ROLES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
DISCONNECT_POLL_S = 0.25
NOT_READY_RETRY_S = 5
GENERATE = "generate"   # the Job kind of a GenerationPlan
INTERROGATE = INTERROGATE_JOB   # the Job kind of an InterrogationJob


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
        self._runner: JobRunner | None = None
        self.interrogation: InterrogationService | None = None
        self.load_error: str | None = None   # set when a background start failed
        self._shutting_down = False
        self._consecutive_failures = 0

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Load models (unless given) and the CLIP interrogator, build the runner, CapabilityTable,
        OptionsStore; start the worker (which builds the tag cache in slices between jobs)."""
        from .capabilities import CapabilityTable
        from .interrogation import InterrogationService
        from .options import OptionsStore

        if self._worker is not None:
            return
        if self.models is None:
            self.models = load_configured_models(self.settings, self._wrap)
        elif self._wrap is not None:
            self.models = wrap_models(self.models, self._wrap)
        self.capabilities = CapabilityTable.from_models(self.models, self.settings)
        self.options = OptionsStore(self.settings, self.models)
        self._runner = JobRunner.for_models(self.models, self.progress, self._preview_period)
        self.interrogation = InterrogationService.load(self.models, self.settings, self._wrap)
        if not self.interrogation.available:
            log.info("interrogation off: %s", self.interrogation.status()["reason"])
        worker = Worker(self.queue, self._run_job, idle=self.interrogation.build_slice)
        worker.start()
        self._worker = worker   # set once running: `started` and shutdown's join see a live thread
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
    def _refuse_unless_accepting(self) -> None:
        """Raise (and count) the 503 that says why no job can be taken now."""
        try:
            self._check_accepting()
        except ServiceUnavailableError as exc:
            self.metrics.reject(_reason(exc))
            raise

    def _check_accepting(self) -> None:
        if self._shutting_down:
            raise ShuttingDownError("The service is shutting down and accepts no new jobs")
        if self.device_lost:
            raise DeviceLostError(f"The NPU is unavailable ({self.device_lost}); restart the service")
        self.require_ready()
        assert self._worker is not None
        if not self._worker.is_alive():
            raise DeviceLostError("The NPU worker thread is not running; restart the service")

    def require_ready(self) -> None:
        """The one "not ready" answer: 503 while the models load (Retry-After), or why they did not."""
        if self.load_error:
            raise DeviceLostError(f"The models failed to load ({self.load_error})")
        if self._worker is None:
            raise NotReadyError("Models are still loading", retry_after=NOT_READY_RETRY_S)

    def plan(self, request: GenerationRequest) -> GenerationPlan:
        """The capability table's plan for `request` under the current options (CapabilityError: 422)."""
        self.require_ready()
        assert self.capabilities is not None
        return self.capabilities.apply(request, self.options)

    async def submit(
        self,
        plan: GenerationPlan,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> GenerationResult:
        """Queue one plan and wait for its result; raises the 503s of service/errors.py, StageError
        (500) and ClientDisconnectedError (499)."""
        job = await self._queue_and_wait(GENERATE, plan, plan.task_id, is_disconnected)
        result: GenerationResult = job.future.result()
        self.metrics.generation_seconds.observe(time.monotonic() - job.enqueued_at)
        note_request(warnings=result.warnings, stage_ms={k: round(v, 1) for k, v in result.stage_ms.items()},
                     queue_wait_ms=round(result.queue_wait_ms, 1))
        return result

    async def _queue_and_wait(self, kind: str, payload: Any, task_id: str,
                              is_disconnected: Callable[[], Awaitable[bool]] | None) -> Job:
        """Queue one job (the 503s when refused) and wait until it is done; returns the finished job."""
        self._refuse_unless_accepting()
        loop = asyncio.get_running_loop()
        job = Job(kind=kind, payload=payload, task_id=task_id, loop=loop, future=loop.create_future())
        try:
            ahead = self.queue.put(job)
        except ServiceUnavailableError as exc:
            self.metrics.reject(_reason(exc))
            raise
        note_request(task_id=job.task_id, jobs_ahead=ahead)
        try:
            await self._wait(job, is_disconnected)
        except asyncio.CancelledError:
            if self.queue.remove(job):
                self.metrics.reject("cancelled")
            raise
        return job

    async def interrogate(self, image: Any, categories: Any = None, structured: bool = False,
                          is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> dict[str, Any]:
        """/interrogate (or /interrogate/structured): decode and check here, then CLIP on the NPU worker
        through the same queue as generation; returns the answer body (404/400/501 as RequestError or
        FeatureUnavailableError)."""
        self._refuse_unless_accepting()  # before decoding any image
        assert self.interrogation is not None
        service = self.interrogation
        job_payload = await asyncio.to_thread(service.request, image, categories, structured)
        job = await self._queue_and_wait(INTERROGATE, job_payload, job_payload.task_id, is_disconnected)
        return job.future.result()

    async def generate(
        self,
        translate: Callable[[], GenerationRequest],
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[GenerationResult, EncodedResult]:
        """What every generation route does: translate the payload and plan it (off the event loop:
        images are decoded and resized), queue the plan, then encode its images in this request's
        thread (not on the NPU worker)."""
        from .results import encode_result

        self._refuse_unless_accepting()  # before decoding any image
        plan = await asyncio.to_thread(lambda: self.plan(translate()))
        result = await self.submit(plan, is_disconnected=is_disconnected)
        encoded = await asyncio.to_thread(
            encode_result, result, self.options.checkpoint if self.options else None,
            png_compress_level=self.settings.png_compress_level, output_dir=self.settings.output_dir,
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

    # --- options read per job -----------------------------------------------------------------------
    def _preview_period(self) -> int | None:
        """Steps between live previews, or None when previews are off."""
        if not self._option("live_previews_enable", self.settings.live_previews):
            return None
        every = int(self._option("show_progress_every_n_steps", self.settings.show_progress_every_n_steps))
        return every if every > 0 else None

    def _option(self, key: str, default: Any) -> Any:
        value = self.options.get(key) if self.options is not None else None
        return default if value is None else value

    def _run_job(self, job: Job) -> GenerationResult | dict[str, Any]:
        """Runs on the worker thread; keeps count of failures for the device-loss check."""
        if self.device_lost:
            raise DeviceLostError(f"The NPU is unavailable ({self.device_lost}); restart the service")
        wait_s = (job.started_at or time.monotonic()) - job.enqueued_at
        self.metrics.queue_wait_seconds.observe(wait_s)
        if job.kind == INTERROGATE:
            assert self.interrogation is not None
            try:
                answer = self.interrogation.run(job.payload, self.progress)
            except StageError as exc:
                self.metrics.jobs.labels(outcome="failed").inc()
                self._note_stage_failure(exc)
                raise
            self._consecutive_failures = 0
            self.metrics.jobs.labels(outcome="ok").inc()
            return answer
        assert self._runner is not None and job.kind == GENERATE, job.kind
        try:
            result = self._runner.run(job.payload, queue_wait_ms=wait_s * 1000.0)
        except Exception as exc:
            self.metrics.jobs.labels(outcome="failed").inc()
            if isinstance(exc, StageError):
                self._note_stage_failure(exc)
            raise
        self._consecutive_failures = 0
        self.metrics.images.inc(len(result.images))
        self.metrics.jobs.labels(outcome="interrupted" if result.interrupted else "ok").inc()
        self.metrics.observe_stages(result.stage_ms)
        return result

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

    def progress_snapshot(self, skip_current_image: bool = False) -> dict[str, Any]:
        """The body of GET /sdapi/v1/progress."""
        return self.progress.snapshot(skip_current_image)

    def get_options(self) -> dict[str, Any]:
        """The A1111 options (GET /sdapi/v1/options); NotReadyError while loading."""
        self.require_ready()
        assert self.options is not None
        return self.options.as_dict()

    def set_options(self, changes: Mapping[str, Any]) -> list[str]:
        """Apply and persist option changes; returns the ignored keys (RequestError for a bad value)."""
        self.require_ready()
        assert self.options is not None
        return self.options.update(dict(changes))

    def sd_models(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/sd-models: the one loaded model (none while loading)."""
        checkpoint = self.options.checkpoint if self.options else None
        return [checkpoint.sd_models_item()] if checkpoint else []

    def capabilities_dict(self) -> dict[str, Any]:
        """GET /capabilities: the capability table as data; NotReadyError while loading."""
        self.require_ready()
        assert self.capabilities is not None and self.interrogation is not None
        return {**self.capabilities.to_dict(), "interrogate": self.interrogation.status()}

    def metrics_exposition(self) -> bytes:
        """GET /metrics: this engine's Prometheus registry in the text format."""
        return self.metrics.exposition()

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
