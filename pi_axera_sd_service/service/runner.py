"""The worker side of a job: every image of one request through the Pipeline, on the NPU worker thread.

Interrupt returns what the job has: the current image is decoded from its last step and the
remaining images are not started. Skip follows A1111: the current image stops at the next step
boundary, its partial result is kept (decoded), and the job goes on with the next image.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from .progress import ProgressControl, ProgressState

if TYPE_CHECKING:
    from ..pipeline.generate import Pipeline
    from .metrics import ServiceMetrics
    from .queue import Job
    from .request import GenerationRequest


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


def add_stage_times(timings_ms: dict[str, float], into: dict[str, float]) -> None:
    """Add per-image timings into per-job stage sums (per-step UNet keys are folded into `unet`)."""
    for key, ms in timings_ms.items():
        if key.startswith("unet_step"):
            continue
        stage = "unet" if key == "unet_total" else key
        into[stage] = into.get(stage, 0.0) + ms


class JobRunner:
    """Runs jobs on the worker thread, reporting progress and honouring interrupt/skip."""

    def __init__(self, pipeline: Pipeline, image_size: tuple[int, int], progress: ProgressState,
                 metrics: ServiceMetrics, preview_period: Callable[[], int | None]):
        self.pipeline = pipeline
        self.image_size = image_size
        self.progress = progress
        self.metrics = metrics
        self.preview_period = preview_period   # steps between live previews, None when off

    def run(self, job: Job) -> GenerationResult:
        """Every image of the job's request; raises what the pipeline raises (StageError, ...)."""
        try:
            result = self._run(job)
        except Exception:
            self.metrics.jobs.labels(outcome="failed").inc()
            raise
        self.metrics.images.inc(len(result.images))
        self.metrics.jobs.labels(outcome="interrupted" if result.interrupted else "ok").inc()
        self.metrics.observe_stages(result.stage_ms)
        return result

    def _run(self, job: Job) -> GenerationResult:
        req = job.request
        wait_ms = ((job.started_at or time.monotonic()) - job.enqueued_at) * 1000.0
        self.metrics.queue_wait_seconds.observe(wait_ms / 1000.0)
        image_jobs = req.image_jobs(*self.image_size)
        started = time.perf_counter()
        timestamp = self.progress.begin(job.task_id, f"scripts_{req.mode}", len(image_jobs))
        images: list[Image.Image] = []
        done_jobs = []
        steps_run: list[int] = []
        warnings: list[str] = list(req.warnings)
        stage_ms: dict[str, float] = {}
        skipped = 0
        interrupted = False
        preview_every = self.preview_period()
        conditioner = self.pipeline.text_conditioner(req.emphasis)  # embeddings cached across the images
        try:
            for index, image_job in enumerate(image_jobs):
                if self.progress.is_interrupted():  # the remaining images are not started
                    interrupted = True
                    break
                self.progress.next_image(index, len(image_job.timesteps))
                control = ProgressControl(self.progress, self.pipeline.decode_preview, preview_every)
                output = self.pipeline.generate(image_job, control, conditioner)
                if control.preview_ms:
                    stage_ms["vae_preview"] = stage_ms.get("vae_preview", 0.0) + control.preview_ms
                if output.steps_run < len(image_job.timesteps):  # cut short: by interrupt or by skip
                    if self.progress.is_interrupted():
                        interrupted = True
                    else:
                        skipped += 1
                images.append(output.image)
                done_jobs.append(image_job)
                steps_run.append(output.steps_run)
                add_stage_times(output.timings_ms, stage_ms)
                warnings.extend(w for w in output.warnings if w not in warnings)
        finally:
            self.progress.end()
        return GenerationResult(
            request=req, images=images,
            seeds=[j.seed for j in done_jobs], subseeds=[j.subseed for j in done_jobs],
            prompts=[j.prompt for j in done_jobs], negative_prompts=[j.negative_prompt for j in done_jobs],
            warnings=warnings, text_time_ms=stage_ms.get("text", 0.0),
            total_time_ms=(time.perf_counter() - started) * 1000.0, stage_ms=stage_ms,
            job_timestamp=timestamp, interrupted=interrupted, skipped_images=skipped,
            queue_wait_ms=wait_ms, task_id=job.task_id, steps_run=steps_run,
        )
