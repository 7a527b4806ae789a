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

from ..pipeline.generate import Pipeline
from ..pipeline.tokenizer import ClipTokenizer
from .progress import ProgressControl, ProgressState

if TYPE_CHECKING:
    from ..runtime.model_dir import LoadedModels
    from .plan import GenerationPlan


@dataclass
class GenerationResult:
    """What one plan produced (images not yet encoded); per returned image where a list."""

    plan: GenerationPlan
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
    steps_run: list[int] = field(default_factory=list)
    image_timings_ms: list[dict[str, float]] = field(default_factory=list)   # the pipeline's, per image


def add_stage_times(timings_ms: dict[str, float], into: dict[str, float]) -> None:
    """Add per-image timings into per-job stage sums (per-step UNet keys are folded into `unet`)."""
    for key, ms in timings_ms.items():
        if key.startswith("unet_step"):
            continue
        stage = "unet" if key == "unet_total" else key
        into[stage] = into.get(stage, 0.0) + ms


class JobRunner:
    """Runs plans through the Pipeline on the worker thread, reporting progress, honouring interrupt/skip."""

    def __init__(self, pipeline: Pipeline, progress: ProgressState,
                 preview_period: Callable[[], int | None] = lambda: None):
        self.pipeline = pipeline
        self.progress = progress
        self.preview_period = preview_period   # steps between live previews, None when off

    @classmethod
    def for_models(cls, models: LoadedModels, progress: ProgressState,
                   preview_period: Callable[[], int | None] = lambda: None) -> JobRunner:
        """A runner over a new Pipeline on `models` (each worker owns its sessions)."""
        return cls(Pipeline(models, ClipTokenizer.from_dir(models.tokenizer_dir)), progress, preview_period)

    def run(self, plan: GenerationPlan, queue_wait_ms: float = 0.0) -> GenerationResult:
        """Every image of the plan; raises what the pipeline raises (StageError, ...)."""
        image_jobs = plan.image_jobs()
        started = time.perf_counter()
        timestamp = self.progress.begin(plan.task_id, f"scripts_{plan.mode}", len(image_jobs))
        images: list[Image.Image] = []
        done_jobs = []
        steps_run: list[int] = []
        image_timings: list[dict[str, float]] = []
        warnings: list[str] = list(plan.warnings)
        stage_ms: dict[str, float] = {}
        skipped = 0
        interrupted = False
        preview_every = self.preview_period()
        conditioner = self.pipeline.text_conditioner(plan.emphasis)  # embeddings cached across the images
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
                image_timings.append(dict(output.timings_ms))
                add_stage_times(output.timings_ms, stage_ms)
                warnings.extend(w for w in output.warnings if w not in warnings)
        finally:
            self.progress.end()
        return GenerationResult(
            plan=plan, images=images,
            seeds=[j.seed for j in done_jobs], subseeds=[j.subseed for j in done_jobs],
            prompts=[j.prompt for j in done_jobs], negative_prompts=[j.negative_prompt for j in done_jobs],
            warnings=warnings, text_time_ms=stage_ms.get("text", 0.0),
            total_time_ms=(time.perf_counter() - started) * 1000.0, stage_ms=stage_ms,
            job_timestamp=timestamp, interrupted=interrupted, skipped_images=skipped,
            queue_wait_ms=queue_wait_ms, steps_run=steps_run, image_timings_ms=image_timings,
        )
