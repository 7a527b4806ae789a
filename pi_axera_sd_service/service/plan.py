"""GenerationPlan: what will run, fully resolved by `CapabilityTable.apply`; the only thing that is queued.

Frozen and complete: the worker turns it into pipeline ImageJobs, the encoder writes its infotexts
from it, and nothing downstream chooses a default again.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

from PIL import Image

from ..pipeline.generate import ImageJob

TASK_ID_CHARS = string.ascii_uppercase + string.digits


def new_task_id(mode: str) -> str:
    """`task(txt2img-XXXXXXXXXXXXXXX)` like A1111's create_task_id."""
    return f"task({mode}-{''.join(secrets.choice(TASK_ID_CHARS) for _ in range(15))})"


@dataclass(frozen=True)
class ImagePlan:
    """One image of a plan: its seeds and (img2img) its init image, already at the model size."""

    seed: int
    subseed: int
    init_image: Image.Image | None


@dataclass(frozen=True)
class GenerationPlan:
    """One generation job as it will run and be reported."""

    task_id: str
    mode: str                        # "txt2img" | "img2img"
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int                       # the schedule length (A1111 "Steps")
    timesteps: tuple[int, ...]       # what each image runs (img2img: the tail of the `steps` schedule)
    sampler_name: str
    scheduler: str
    cfg_scale: float                 # <= 1: one UNet pass per step
    subseed_strength: float
    denoising_strength: float        # 1.0 for txt2img (everything is denoised)
    resize_mode: int                 # how init images were fitted (img2img)
    batch_size: int
    n_iter: int
    images: tuple[ImagePlan, ...]    # batch_size × n_iter, in order
    emphasis: str
    max_and_prompts: int
    clip_skip: int
    samples_format: str              # png | jpeg | webp
    jpeg_quality: int
    send_images: bool
    save_images: bool
    warnings: tuple[str, ...]        # from translation and the capability table

    @property
    def all_seeds(self) -> tuple[int, ...]:
        return tuple(image.seed for image in self.images)

    @property
    def all_subseeds(self) -> tuple[int, ...]:
        return tuple(image.subseed for image in self.images)

    @property
    def seed(self) -> int:
        return self.images[0].seed

    def image_jobs(self) -> list[ImageJob]:
        """One pipeline ImageJob per image, in order."""
        return [
            ImageJob(
                prompt=self.prompt, negative_prompt=self.negative_prompt, seed=image.seed,
                subseed=image.subseed, subseed_strength=self.subseed_strength,
                timesteps=list(self.timesteps), cfg_scale=self.cfg_scale, init_image=image.init_image,
                emphasis=self.emphasis, max_and_prompts=self.max_and_prompts,
            )
            for image in self.images
        ]
