"""Turn a GenerationResult into what the routes return: infotexts, encoded images, A1111 `info`.

Runs in the request's thread (FastAPI threadpool / asyncio.to_thread), never on the NPU worker.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..pipeline.images import encode_image
from .infotext import create_infotext, service_version
from .options import DEFAULT_EMPHASIS, CheckpointInfo

if TYPE_CHECKING:
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


def extra_generation_params(result: GenerationResult) -> dict[str, Any]:
    """Infotext entries beyond the standard ones (only non-default values, as A1111)."""
    extra: dict[str, Any] = {}
    if result.request.emphasis != DEFAULT_EMPHASIS:
        extra["Emphasis"] = result.request.emphasis
    return extra


def build_infotexts(result: GenerationResult, checkpoint: CheckpointInfo | None) -> list[str]:
    """One A1111 infotext per returned image, with the seed that image ran with.

    "Steps" keeps A1111's meaning: the schedule length, of which img2img runs the last
    round(strength × steps); with "Denoising strength" it reproduces the image."""
    req = result.request
    extra = extra_generation_params(result)
    texts = []
    for i in range(len(result.images)):
        texts.append(create_infotext(
            prompt=result.prompts[i] if i < len(result.prompts) else req.prompt,
            negative_prompt=(
                result.negative_prompts[i] if i < len(result.negative_prompts) else req.negative_prompt
            ),
            steps=int(req.steps), sampler=req.sampler_name or "LCM",
            scheduler_label=SCHEDULER_LABEL, cfg_scale=float(req.cfg_scale),
            seed=result.seeds[i], width=int(req.width or 0), height=int(req.height or 0),
            model_hash=checkpoint.shorthash if checkpoint else None,
            model_name=checkpoint.model_name if checkpoint else None,
            subseed=result.subseeds[i] if i < len(result.subseeds) else None,
            subseed_strength=float(req.subseed_strength or 0.0),
            denoising_strength=req.denoising_strength if req.mode == "img2img" else None,
            clip_skip=req.clip_skip, extra=extra,
        ))
    return texts


def info_dict(
    result: GenerationResult, infotexts: list[str], checkpoint: CheckpointInfo | None
) -> dict[str, Any]:
    """A1111 `Processed.js()` keys, reporting what actually ran, plus `warnings`."""
    req = result.request
    seeds = result.seeds or list(req.all_seeds[:1])
    subseeds = result.subseeds or list(req.all_subseeds[:1])
    return {
        "prompt": req.prompt,
        "all_prompts": list(result.prompts),
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": list(result.negative_prompts),
        "seed": seeds[0] if seeds else None,
        "all_seeds": list(result.seeds),
        "subseed": subseeds[0] if subseeds else None,
        "all_subseeds": list(result.subseeds),
        "subseed_strength": req.subseed_strength,
        "width": req.width,
        "height": req.height,
        "sampler_name": req.sampler_name,
        "cfg_scale": req.cfg_scale,
        "steps": len(req.timesteps),   # img2img: the part of the `steps` schedule its strength runs
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": checkpoint.model_name if checkpoint else None,
        "sd_model_hash": checkpoint.shorthash if checkpoint else None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": req.denoising_strength if req.mode == "img2img" else None,
        "extra_generation_params": extra_generation_params(result),
        "index_of_first_image": 0,
        "infotexts": list(infotexts),
        "styles": list(req.styles),
        "job_timestamp": result.job_timestamp,
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": service_version(),
        "warnings": list(result.warnings),
        "interrupted": result.interrupted,
        "total_time_ms": round(result.total_time_ms, 1),
    }


def encode_result(
    result: GenerationResult,
    checkpoint: CheckpointInfo | None,
    *,
    png_compress_level: int = 1,
    output_dir: Path | None = None,
) -> EncodedResult:
    """Infotexts, base64 images (no data: prefix) and the info dict; saves files when asked."""
    req = result.request
    infotexts = build_infotexts(result, checkpoint)
    fmt = (req.samples_format or "png").lower()
    blobs = [
        encode_image(img, fmt, text, jpeg_quality=req.jpeg_quality, png_compress_level=png_compress_level)
        for img, text in zip(result.images, infotexts, strict=True)
    ]
    paths: list[Path] = []
    if req.save_images and output_dir is not None:
        paths = save_images(blobs, output_dir, fmt, result.job_timestamp, result.seeds)
    images_b64 = [base64.b64encode(b).decode("ascii") for b in blobs] if req.send_images else []
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
    """The request echoed as A1111 does (defaults filled, seed as sent); images dropped unless asked."""
    params = dict(echo)
    if not include_init_images:
        for key in ("init_images", "mask"):
            if key in params:
                params[key] = None
    return params
