"""Turn a GenerationResult into what the routes return: infotexts, encoded images, A1111 `info`.

Runs in the request's thread (FastAPI threadpool / asyncio.to_thread), never on the NPU worker.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..pipeline.images import b64encode_text, encode_image
from .infotext import create_infotext, service_version
from .options import DEFAULT_EMPHASIS, CheckpointInfo

if TYPE_CHECKING:
    from .plan import GenerationPlan
    from .runner import GenerationResult

SCHEDULER_LABEL = "Automatic"
EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}


@dataclass
class EncodedResult:
    """Encoded images of one result plus everything reported about them."""

    images_b64: list[str]
    infotexts: list[str]
    info: dict[str, Any]
    paths: list[Path] = field(default_factory=list)


def extra_generation_params(plan: GenerationPlan) -> dict[str, Any]:
    """Infotext entries beyond the standard ones (only non-default values, as A1111)."""
    extra: dict[str, Any] = {}
    if plan.emphasis != DEFAULT_EMPHASIS:
        extra["Emphasis"] = plan.emphasis
    return extra


def build_infotexts(result: GenerationResult, checkpoint: CheckpointInfo | None) -> list[str]:
    """One A1111 infotext per returned image, with the seed that image ran with.

    "Steps" keeps A1111's meaning: the schedule length, of which img2img runs the last
    round(strength × steps); with "Denoising strength" it reproduces the image."""
    plan = result.plan
    extra = extra_generation_params(plan)
    return [
        create_infotext(
            prompt=result.prompts[i], negative_prompt=result.negative_prompts[i], steps=plan.steps,
            sampler=plan.sampler_name, scheduler_label=SCHEDULER_LABEL, cfg_scale=plan.cfg_scale,
            seed=result.seeds[i], width=plan.width, height=plan.height,
            model_hash=checkpoint.shorthash if checkpoint else None,
            model_name=checkpoint.model_name if checkpoint else None,
            subseed=result.subseeds[i], subseed_strength=plan.subseed_strength,
            denoising_strength=plan.denoising_strength if plan.mode == "img2img" else None,
            clip_skip=plan.clip_skip, extra=extra,
        )
        for i in range(len(result.images))
    ]


def info_dict(
    result: GenerationResult, infotexts: list[str], checkpoint: CheckpointInfo | None
) -> dict[str, Any]:
    """A1111 `Processed.js()` keys, reporting what actually ran, plus `warnings`."""
    plan = result.plan
    seeds = result.seeds or list(plan.all_seeds[:1])
    subseeds = result.subseeds or list(plan.all_subseeds[:1])
    return {
        "prompt": plan.prompt,
        "all_prompts": list(result.prompts),
        "negative_prompt": plan.negative_prompt,
        "all_negative_prompts": list(result.negative_prompts),
        "seed": seeds[0],
        "all_seeds": list(result.seeds),
        "subseed": subseeds[0],
        "all_subseeds": list(result.subseeds),
        "subseed_strength": plan.subseed_strength,
        "width": plan.width,
        "height": plan.height,
        "sampler_name": plan.sampler_name,
        "cfg_scale": plan.cfg_scale,
        "steps": len(plan.timesteps),   # img2img: the part of the `steps` schedule its strength runs
        "batch_size": plan.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": checkpoint.model_name if checkpoint else None,
        "sd_model_hash": checkpoint.shorthash if checkpoint else None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": plan.denoising_strength if plan.mode == "img2img" else None,
        "extra_generation_params": extra_generation_params(plan),
        "index_of_first_image": 0,
        "infotexts": list(infotexts),
        "styles": [],   # no styles are installed; requested ones were warned about
        "job_timestamp": result.job_timestamp,
        "clip_skip": plan.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": service_version(),
        "warnings": list(result.warnings),
        "interrupted": result.interrupted,
        "total_time_ms": round(result.total_time_ms, 1),
    }


def encode_images(
    result: GenerationResult, checkpoint: CheckpointInfo | None, png_compress_level: int = 1
) -> tuple[list[bytes], list[str]]:
    """(encoded image files, their infotexts) in the plan's samples_format."""
    plan = result.plan
    infotexts = build_infotexts(result, checkpoint)
    blobs = [
        encode_image(img, plan.samples_format, text, jpeg_quality=plan.jpeg_quality,
                     png_compress_level=png_compress_level)
        for img, text in zip(result.images, infotexts, strict=True)
    ]
    return blobs, infotexts


def encode_result(
    result: GenerationResult,
    checkpoint: CheckpointInfo | None,
    *,
    png_compress_level: int = 1,
    output_dir: Path | None = None,
) -> EncodedResult:
    """Infotexts, base64 images (no data: prefix) and the info dict; saves files when the plan asks."""
    plan = result.plan
    blobs, infotexts = encode_images(result, checkpoint, png_compress_level)
    paths: list[Path] = []
    if plan.save_images and output_dir is not None:
        paths = save_images(blobs, output_dir, plan.samples_format, result.job_timestamp, result.seeds)
    images_b64 = [b64encode_text(b) for b in blobs] if plan.send_images else []
    return EncodedResult(images_b64, infotexts, info_dict(result, infotexts, checkpoint), paths)


def save_images(
    blobs: list[bytes], output_dir: Path, fmt: str, job_timestamp: str, seeds: list[int]
) -> list[Path]:
    """Write each image atomically (temp file + os.replace) as `<timestamp>-<seed>-<i>-<id>.<ext>`."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ext = EXTENSIONS.get(fmt, fmt)
    tag = uuid.uuid4().hex[:6]
    paths = []
    for i, blob in enumerate(blobs):
        seed = seeds[i] if i < len(seeds) else 0
        target = folder / f"{job_timestamp}-{seed}-{i:02d}-{tag}.{ext}"
        tmp = folder / f".saving-{uuid.uuid4().hex}.{ext}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides, as for any tool
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(target)
    return paths


def sdapi_parameters(echo: Mapping[str, Any], include_init_images: bool = False) -> dict[str, Any]:
    """The request echoed as A1111's `vars(request)`: every field as sent, A1111's defaults for the
    omitted ones (steps 50, cfg_scale 7, sampler_index "Euler"; not what ran: that is `info`), seed
    as sent. img2img keeps its `include_init_images` flag and drops the images unless it is set."""
    params = dict(echo)
    if "init_images" in params:
        params["include_init_images"] = include_init_images
        if not include_init_images:
            params["init_images"] = params["mask"] = None
    return params
