"""Engine: the one object the API (and its dependencies) talks to. It owns the devices (one worker
thread, its sessions and its Pipeline per NPU), the capability table, the options and the job queue.

The request's way: translate (route) -> CapabilityTable.apply -> GenerationPlan -> queue -> workers
(JobRunner: Pipeline, one image per part) -> encode_result. What a worker does with an image is in
runner.py; a plan's images may run on several devices at once and are reassembled in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from ..pipeline.stages import StageError
from ..runtime.model_dir import count_devices, device_index_error
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
from .interrogation import InterrogationService
from .metrics import ServiceMetrics, note_request
from .progress import INTERROGATE_JOB, ProgressState
from .queue import (
    DEVICE_LOST_AFTER_FAILURES,
    Job,
    JobQueue,
    Part,
    PartRequeued,
    Worker,
    looks_like_device_loss,
)
from .runner import GenerationResult, JobRunner, PlanRun

if TYPE_CHECKING:
    from ..runtime.model_dir import LoadedModels, ModelFiles, Wrap
    from ..settings import Settings
    from .capabilities import CapabilityTable
    from .options import OptionsStore
    from .plan import GenerationPlan
    from .request import GenerationRequest
    from .results import EncodedResult

log = logging.getLogger(__name__)

SESSION_ROLES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
DISCONNECT_POLL_S = 0.25
NOT_READY_RETRY_S = 5
READY_POLL_S = 0.05     # how often a request waiting for the model load looks again
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


def load_configured_models(settings: Settings, wrap: Wrap | None = None,
                           device_id: int | None = None) -> LoadedModels:
    """Resolve the model files from settings (or the demo pack) and load them on one device
    (default: the first configured one)."""
    from ..runtime.model_dir import load_models

    files, backend = configured_model_files(settings)
    device = settings.devices[0] if device_id is None else device_id
    return load_models(files, backend, device_id=device, wrap=wrap, cache_dir=settings.cache_dir,
                       lean_memory=settings.lean_memory)


def device_count(backend: str) -> int | None:
    """How many NPUs the backend sees, or None when it sets no limit (onnxruntime: N CPU session sets)
    or cannot tell (`runtime.count_devices`; a runtime that cannot start is reported by the load)."""
    try:
        return count_devices(backend)
    except ModelLoadError:
        return None


def describe_devices(devices: tuple[int, ...], backend: str, count: int | None) -> str:
    """The start-up / check-models line: which devices are configured and how many the backend sees."""
    found = f"{count} NPU device(s) found" if count is not None else (
        "one CPU session set per device" if backend == "onnxruntime" else "device count unknown")
    return f"devices: {', '.join(map(str, devices))} on {backend} ({found})"


def check_device_indexes(devices: tuple[int, ...], count: int | None, backend: str) -> None:
    """ModelLoadError naming the first index out of range and the count, in the runtime's words
    (with no count, or none found, the load reports it)."""
    for index in devices:
        if count and index >= count:
            raise device_index_error(backend, index, count)


_THREAD = threading.local()


def current_device() -> int | None:
    """The device index of the worker thread calling (None elsewhere); `wrap` may ask it."""
    return getattr(_THREAD, "device", None)


@dataclass(eq=False)
class Device:
    """One NPU (on onnxruntime: one CPU session set): its worker thread, sessions and counters."""

    index: int
    models: LoadedModels | None = None
    runner: JobRunner | None = None
    worker: Worker | None = None
    load_error: str | None = None
    lost: str | None = None
    busy: bool = False
    images: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    loaded: threading.Event = field(default_factory=threading.Event)

    @property
    def usable(self) -> bool:
        """Loaded and not lost."""
        return self.runner is not None and self.lost is None

    def status(self) -> str:
        if self.load_error:
            return "load_failed"
        if self.lost:
            return "lost"
        if self.runner is None or self.worker is None:
            return "starting"
        return "ok" if self.worker.is_alive() else "worker_dead"

    def describe(self) -> dict[str, Any]:
        """Its row in /health."""
        row: dict[str, Any] = {"index": self.index, "status": self.status(), "busy": self.busy,
                               "images": self.images, "failures": self.failures}
        if self.load_error or self.lost:
            row["detail"] = self.load_error or self.lost
        return row


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
        self.device_lost: str | None = None  # set when no device is left
        self.devices: list[Device] = []
        self._started = False
        self._go = threading.Event()     # workers take jobs once every device has loaded
        self._lock = threading.Lock()
        self.interrogation: InterrogationService | None = None
        self.load_error: str | None = None   # set when a background start failed
        self.load_ended = threading.Event()  # set once start() has loaded the models or failed to
        self._shutting_down = False

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Load the models on every configured device in parallel (each on its own worker thread,
        unless given), then build the CapabilityTable and OptionsStore and let the workers take jobs.

        A device that fails to load is reported by index; with at least one loaded the service starts
        degraded (unless `require_all_devices`). ModelLoadError when none loads.
        The CLIP interrogator loads once (its tag cache is built in slices by the first worker while
        no job waits)."""
        from .capabilities import CapabilityTable
        from .options import OptionsStore

        if self._started or self.devices:
            return
        indexes = self.settings.devices
        backend = self.models.backend if self.models is not None else configured_model_files(self.settings)[1]
        count = device_count(backend)
        check_device_indexes(indexes, count, backend)
        log.info("%s", describe_devices(indexes, backend, count))
        self.devices = [Device(index) for index in indexes]
        for device in self.devices:
            device.worker = Worker(self.queue, partial(self._run_part, device), self._finish,
                                   name=f"npu-worker-{device.index}",
                                   setup=partial(self._load_device, device), go=self._go,
                                   idle=self._build_tags_slice if device is self.devices[0] else None)
            device.worker.start()
        for device in self.devices:
            device.loaded.wait()
        failed = [d for d in self.devices if d.load_error]
        if failed:
            self._refuse_failed_devices(failed)
        first = next(d for d in self.devices if d.usable)
        assert first.models is not None
        self.models = first.models
        self.capabilities = CapabilityTable.from_models(self.models, self.settings)
        self.options = OptionsStore(self.settings, self.models)
        if self.interrogation is None:  # the first device failed to load: CLIP goes with the one serving
            self.interrogation = InterrogationService.load(self.models, self.settings, self._wrap)
        if not self.interrogation.available:
            log.info("interrogation off: %s", self.interrogation.status()["reason"])
        self.queue.times.parallel = len(self.devices) - len(failed)
        for device in self.devices:
            self.metrics.bind_device(device.index, lambda d=device: 1.0 if d.status() == "ok" else 0.0,
                                     lambda d=device: 1.0 if d.busy else 0.0)
        self._go.set()
        self.load_ended.set()
        self._started = True   # set once running: `started` and shutdown's join see live threads
        log.info("engine ready: %s on %s, device(s) %s (max_queue=%d)", self.models.model_name,
                 self.models.backend, ", ".join(str(d.index) for d in self.devices if d.usable),
                 self.settings.max_queue)

    def _refuse_failed_devices(self, failed: list[Device]) -> None:
        """Raise when no device loaded (or some failed under require_all_devices); else log degraded."""
        reasons = "; ".join(f"device {d.index}: {d.load_error}" for d in failed)
        if len(failed) == len(self.devices) or self.settings.require_all_devices:
            for device in self.devices:
                if device.worker is not None:
                    device.worker.stop()
            self._go.set()
            if len(failed) == len(self.devices):
                raise ModelLoadError(reasons if len(self.devices) == 1
                                     else f"no device loaded the models ({reasons})")
            raise ModelLoadError(f"{reasons} (REQUIRE_ALL_DEVICES is set)")
        serving = ", ".join(str(d.index) for d in self.devices if not d.load_error)
        log.warning("DEGRADED start: %d of %d devices failed to load (%s); serving on device(s) %s",
                    len(failed), len(self.devices), reasons, serving)

    def _load_device(self, device: Device) -> None:
        """On the device's worker thread: load (or wrap the given) models and build its runner."""
        _THREAD.device = device.index
        try:
            if self.models is None:
                models = load_configured_models(self.settings, self._wrap, device_id=device.index)
            elif self._wrap is not None:
                models = wrap_models(self.models, self._wrap)
            else:
                models = self.models
            device.models = models
            device.runner = JobRunner.for_models(models, self.progress, self._preview_period)
            if device is self.devices[0]:  # CLIP sessions live on the first device, made on its thread
                self.interrogation = InterrogationService.load(models, self.settings, self._wrap)
        except Exception as exc:
            device.load_error = str(exc) if isinstance(exc, ModelLoadError) \
                else f"{type(exc).__name__}: {exc}"
            log.error("device %d cannot load the models: %s", device.index, device.load_error)
            raise
        finally:
            device.loaded.set()

    def start_in_background(self) -> threading.Thread:
        """start() on a thread; a failure is logged and kept in `load_error` (health then says so)."""

        def load() -> None:
            try:
                self.start()
            except (ModelLoadError, OSError, ValueError) as exc:
                self.load_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ModelLoadError) \
                    else str(exc)
                log.error("cannot load the models: %s", self.load_error)
            finally:
                self.load_ended.set()

        thread = threading.Thread(target=load, name="model-load", daemon=True)
        thread.start()
        return thread

    @property
    def started(self) -> bool:
        return self._started

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
            self.progress.interrupt(every_task=True)
            self.queue.wait_idle(5.0)
        for device in self.devices:
            if device.worker is not None and device.worker.is_alive():
                device.worker.join(timeout=1.0)

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
        if not any(d.usable and d.worker is not None and d.worker.is_alive() for d in self.devices):
            raise DeviceLostError("No NPU worker thread is running; restart the service")

    def require_ready(self) -> None:
        """The one "not ready" answer: 503 while the models load (Retry-After), or why they did not."""
        if self.load_error:
            raise DeviceLostError(f"The models failed to load ({self.load_error})")
        if not self._started:
            raise NotReadyError("Models are still loading", retry_after=NOT_READY_RETRY_S)

    async def wait_ready(self, timeout: float) -> None:
        """Wait up to `timeout` s for the models to finish loading, then `require_ready` (the 503 of
        a failed load or of a load still under way). Polls, so no executor thread is held."""
        deadline = time.monotonic() + timeout
        while not self.load_ended.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(READY_POLL_S)
        self.require_ready()

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
        loop = asyncio.get_running_loop()
        job = Job(kind=GENERATE, payload=plan, task_id=plan.task_id, loop=loop, future=loop.create_future(),
                  parts=max(1, len(plan.images)), context=PlanRun(plan, self.progress))
        result: GenerationResult = await self._queue_and_wait(job, is_disconnected)
        self.metrics.generation_seconds.observe(time.monotonic() - job.enqueued_at)
        note_request(warnings=result.warnings, stage_ms={k: round(v, 1) for k, v in result.stage_ms.items()},
                     queue_wait_ms=round(result.queue_wait_ms, 1))
        return result

    async def _queue_and_wait(self, job: Job, is_disconnected: Callable[[], Awaitable[bool]] | None) -> Any:
        """Queue one job (the 503s when refused) and wait for its result."""
        self._refuse_unless_accepting()
        try:
            ahead = self.queue.put(job)
        except ServiceUnavailableError as exc:
            self.metrics.reject(_reason(exc))
            raise
        note_request(task_id=job.task_id, jobs_ahead=ahead)
        try:
            return await self._wait(job, is_disconnected)
        except asyncio.CancelledError:
            if self.queue.remove(job):
                self.metrics.reject("cancelled")
            raise

    async def interrogate(self, image: Any, categories: Any = None, structured: bool = False,
                          is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> dict[str, Any]:
        """/interrogate (or /interrogate/structured): decode and check here, then CLIP on an NPU worker
        through the same queue as generation; returns the answer body (404/400/501 as RequestError or
        FeatureUnavailableError)."""
        self._refuse_unless_accepting()  # before decoding any image
        assert self.interrogation is not None
        service = self.interrogation
        payload = await asyncio.to_thread(service.request, image, categories, structured)
        loop = asyncio.get_running_loop()
        job = Job(kind=INTERROGATE, payload=payload, task_id=payload.task_id, loop=loop,
                  future=loop.create_future())
        return await self._queue_and_wait(job, is_disconnected)

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

    def _run_part(self, device: Device, part: Part) -> Any:
        """On `device`'s worker thread: one image of a plan, or one interrogation; counts failures for
        the device-loss rule. An image whose device is lost under it runs again on another device
        (once; PartRequeued), so a request survives the loss of one of several cards."""
        job = part.job
        assert device.runner is not None and job.kind in (GENERATE, INTERROGATE), job.kind
        if part.index == 0:
            self.metrics.queue_wait_seconds.observe((job.started_at or time.monotonic()) - job.enqueued_at)
        device.busy = True
        try:
            if job.kind == INTERROGATE:
                assert self.interrogation is not None   # its lock: one worker at a time in CLIP
                job.context = self.interrogation.run(job.payload, self.progress)
                ran = False
            else:
                ran = device.runner.run_image(job.context, part.index)
        except Exception as exc:
            device.failures += 1
            self.metrics.device_failures.labels(device=str(device.index)).inc()
            if isinstance(exc, StageError):
                self._note_stage_failure(device, exc)
            if self._run_elsewhere(device, part):
                log.warning("device %d was lost during image %d of %s: it runs again on another device",
                            device.index, part.index, job.task_id)
                raise PartRequeued(job.task_id) from exc
            if not job.failed:
                self.metrics.jobs.labels(outcome="failed").inc()
            if job.kind == GENERATE:
                job.context.abort()
            raise
        finally:
            device.busy = False
        device.consecutive_failures = 0
        if ran:
            device.images += 1
            self.metrics.device_images.labels(device=str(device.index)).inc()
        return ran

    def _run_elsewhere(self, device: Device, part: Part) -> bool:
        """Requeue an image whose device was just lost, when another device still serves."""
        return (part.job.kind == GENERATE and device.lost is not None
                and any(d.usable for d in self.devices) and self.queue.requeue(part))

    def _build_tags_slice(self) -> bool:
        """The first worker's idle work: one slice of the interrogation tag cache; True while more remains."""
        return self.interrogation is not None and self.interrogation.build_slice()

    def _finish(self, job: Job) -> GenerationResult | dict[str, Any]:
        """The job's last part came back: its images in order (an interrogation: its answer), and
        the job's metrics."""
        if job.kind == INTERROGATE:
            self.metrics.jobs.labels(outcome="ok").inc()
            return job.context
        wait_s = (job.started_at or time.monotonic()) - job.enqueued_at
        result: GenerationResult = job.context.result(queue_wait_ms=wait_s * 1000.0)
        self.metrics.images.inc(len(result.images))
        self.metrics.jobs.labels(outcome="interrupted" if result.interrupted else "ok").inc()
        self.metrics.observe_stages(result.stage_ms)
        return result

    def _note_stage_failure(self, device: Device, exc: StageError) -> None:
        """Count the device's consecutive failures; declare it lost on its error text or after N in a row."""
        device.consecutive_failures += 1
        log.error("device %d: job failed in stage %s: %s", device.index, exc.stage, exc.message)
        if looks_like_device_loss(exc.message):
            self._mark_device_lost(device, f"{exc.stage}: {exc.message}")
        elif device.consecutive_failures >= DEVICE_LOST_AFTER_FAILURES:
            self._mark_device_lost(device, f"{device.consecutive_failures} jobs in a row failed; last: {exc}")

    def _mark_device_lost(self, device: Device, reason: str) -> None:
        """Take the device's worker out; when it was the last one, fail every queued job."""
        with self._lock:
            device.lost = reason
            if device.worker is not None:
                device.worker.stop()
            left = [d.index for d in self.devices if d.usable]
            self.queue.times.parallel = max(1, len(left))
        log.error("NPU device %d marked unavailable: %s", device.index, reason)
        if left:
            log.warning("DEGRADED: continuing on device(s) %s", ", ".join(map(str, left)))
            return
        self.device_lost = reason if len(self.devices) == 1 else f"device {device.index}: {reason}"
        for job in self.queue.drain(started_too=True):
            self.metrics.reject("device_lost")
            job.fail(DeviceLostError(f"The NPU is unavailable ({self.device_lost}); restart the service"))

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
        """{status, backend, model, queue_depth, busy, uptime_s, devices}; "ok" and "degraded" (some
        device lost or not loaded, at least one serving) are healthy."""
        serving = [d for d in self.devices if d.status() == "ok"]
        if self._shutting_down:
            status = "shutting_down"
        elif self.device_lost:
            status = "device_lost"
        elif self.load_error:
            status = "load_failed"
        elif not self._started:
            status = "starting"
        elif not serving:
            status = "worker_dead"
        else:
            status = "ok" if len(serving) == len(self.devices) else "degraded"
        body: dict[str, Any] = {
            "status": status,
            "backend": self.models.backend if self.models else None,
            "model": self.models.model_name if self.models else None,
            "queue_depth": self.queue.depth,
            "busy": any(d.busy for d in self.devices) or self.progress.busy,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "devices": [d.describe() for d in self.devices],
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
