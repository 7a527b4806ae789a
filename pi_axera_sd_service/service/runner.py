"""The worker side of a job: every image of one request through the Pipeline, on the NPU worker thread.

Interrupt returns what the job has: the current image is decoded from its last step and the
remaining images are not started. Skip follows A1111: the current image stops at the next step
boundary, its partial result is kept (decoded), and the job goes on with the next image.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from ..pipeline.conditioning import TextConditioner
from ..pipeline.generate import ImageOutput, Pipeline
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


class PlanRun:
    """One plan's images in flight, possibly on several devices at once, reassembled in order.

    Created when the plan is queued; the first image to start begins the task's progress, and
    `result()` (after the last image) ends it. Image i always runs with seed i, so the answer is the
    same whichever device ran which image."""

    def __init__(self, plan: GenerationPlan, progress: ProgressState):
        self.plan = plan
        self.progress = progress
        self.image_jobs = plan.image_jobs()
        self.outputs: dict[int, tuple[ImageOutput, str | None]] = {}  # index -> (output, cut short by)
        self.preview_ms = 0.0
        self.timestamp = ""
        self._started: float | None = None
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.image_jobs)

    def begin(self) -> None:
        """Begin the task's progress once (the first image to start calls it)."""
        with self._lock:
            if self._started is None:
                self._started = time.perf_counter()
                self.timestamp = self.progress.begin(self.plan.task_id, f"scripts_{self.plan.mode}",
                                                     self.count)

    def add(self, index: int, output: ImageOutput, cut_by: str | None, preview_ms: float) -> None:
        """Image `index` finished; `cut_by` is "skip" or "interrupt" when it stopped early."""
        with self._lock:
            self.outputs[index] = (output, cut_by)
            self.preview_ms += preview_ms

    def abort(self) -> None:
        """A failed image ends the task: images still in flight elsewhere stop at their next step."""
        self.progress.end(self.plan.task_id)

    def result(self, queue_wait_ms: float = 0.0) -> GenerationResult:
        """The images that ran, in plan order, with their seeds, warnings and summed stage times."""
        self.progress.end(self.plan.task_id)
        plan = self.plan
        indexes = sorted(self.outputs)
        warnings: list[str] = list(plan.warnings)
        stage_ms: dict[str, float] = {}
        for index in indexes:
            output = self.outputs[index][0]
            add_stage_times(output.timings_ms, stage_ms)
            warnings.extend(w for w in output.warnings if w not in warnings)
        if self.preview_ms:
            stage_ms["vae_preview"] = self.preview_ms
        cuts = [self.outputs[index][1] for index in indexes]
        interrupted = len(indexes) < self.count or "interrupt" in cuts
        jobs = [self.image_jobs[i] for i in indexes]
        started = self._started if self._started is not None else time.perf_counter()
        return GenerationResult(
            plan=plan, images=[self.outputs[i][0].image for i in indexes],
            seeds=[j.seed for j in jobs], subseeds=[j.subseed for j in jobs],
            prompts=[j.prompt for j in jobs], negative_prompts=[j.negative_prompt for j in jobs],
            warnings=warnings, text_time_ms=stage_ms.get("text", 0.0),
            total_time_ms=(time.perf_counter() - started) * 1000.0, stage_ms=stage_ms,
            job_timestamp=self.timestamp, interrupted=interrupted, skipped_images=cuts.count("skip"),
            queue_wait_ms=queue_wait_ms, steps_run=[self.outputs[i][0].steps_run for i in indexes],
            image_timings_ms=[dict(self.outputs[i][0].timings_ms) for i in indexes],
        )


class JobRunner:
    """Runs images of plans through one device's Pipeline, reporting progress, honouring interrupt/skip."""

    def __init__(self, pipeline: Pipeline, progress: ProgressState,
                 preview_period: Callable[[], int | None] = lambda: None):
        self.pipeline = pipeline
        self.progress = progress
        self.preview_period = preview_period   # steps between live previews, None when off
        self._conditioner: tuple[str, TextConditioner] | None = None   # (task id, its conditioner)

    @classmethod
    def for_models(cls, models: LoadedModels, progress: ProgressState,
                   preview_period: Callable[[], int | None] = lambda: None) -> JobRunner:
        """A runner over a new Pipeline on `models` (each worker owns its sessions)."""
        return cls(Pipeline(models, ClipTokenizer.from_dir(models.tokenizer_dir)), progress, preview_period)

    def run(self, plan: GenerationPlan, queue_wait_ms: float = 0.0) -> GenerationResult:
        """Every image of the plan, one after the other; raises what the pipeline raises (StageError, ...)."""
        plan_run = PlanRun(plan, self.progress)
        try:
            for index in range(plan_run.count):
                if not self.run_image(plan_run, index):
                    break
        except BaseException:
            plan_run.abort()
            raise
        return plan_run.result(queue_wait_ms)

    def run_image(self, plan_run: PlanRun, index: int) -> bool:
        """Image `index` of the plan into `plan_run`; False when the task was interrupted (or failed
        on another device) before it started: it is then not run."""
        plan = plan_run.plan
        plan_run.begin()
        if self.progress.is_interrupted(plan.task_id):
            return False
        image_job = plan_run.image_jobs[index]
        steps = len(image_job.timesteps)
        self.progress.next_image(plan.task_id, index, steps)
        control = ProgressControl(self.progress, plan.task_id, index, self.pipeline.decode_preview,
                                  self.preview_period())
        try:
            output = self.pipeline.generate(image_job, control, self._text_conditioner(plan))
        finally:
            self.progress.image_done(plan.task_id, index)
        cut_by = None
        if output.steps_run < steps:
            cut_by = "interrupt" if self.progress.is_interrupted(plan.task_id) else "skip"
        plan_run.add(index, output, cut_by, control.preview_ms)
        return True

    def _text_conditioner(self, plan: GenerationPlan) -> TextConditioner:
        """The conditioner of this plan on this device: each distinct text is encoded once per device
        and request."""
        if self._conditioner is None or self._conditioner[0] != plan.task_id:
            self._conditioner = (plan.task_id, self.pipeline.text_conditioner(plan.emphasis))
        return self._conditioner[1]
