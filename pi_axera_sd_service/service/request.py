"""GenerationRequest: the one internal request every generation route is translated into.

The translation functions (`from_sdapi`, `from_generate`) are where A1111 and `/generate` differ
(defaults, aliases, data-URI stripping); the capability table (`capabilities.py`) then clamps or
rejects what the hardware cannot do, and `image_jobs()` resolves one ImageJob per image.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..pipeline.generate import ImageJob
from ..pipeline.images import ImageDecodeError, decode_image_b64, resize_image
from ..pipeline.scheduler import img2img_timesteps, txt2img_timesteps
from ..settings import Settings

SEED_RANGE = 2**32
DEFAULT_DENOISING = {"sdapi": 0.75, "generate": 0.5}
MODES = ("txt2img", "img2img")
# A1111 fields that are not supported but need a policy decision (see capabilities.py).
UNSUPPORTED_FIELDS = (
    "enable_hr", "restore_faces", "tiling", "styles", "clip_skip", "seed_resize_from_w", "seed_resize_from_h",
)


class RequestError(Exception):
    """A client error; the message names the field. HTTP status in `status_code`."""

    status_code = 400

    def __init__(self, field: str, message: str, status_code: int | None = None):
        super().__init__(message)
        self.field = field
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class CapabilityError(RequestError):
    """The capability table rejects a field value (422 on /sdapi, 400 on /generate)."""

    status_code = 422


@dataclass
class GenerationRequest:
    """One HTTP generation request, whatever the route. None means "not given: use the table default"."""

    mode: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: Any = -1
    subseed: Any = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    scheduler: str | None = None
    cfg_scale: float | None = None
    batch_size: int = 1
    n_iter: int = 1
    denoising_strength: float | None = None
    resize_mode: int = 0
    init_images: list[Image.Image] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)
    emphasis: str = "Original"
    samples_format: str = "png"
    jpeg_quality: int = 80
    send_images: bool = True
    save_images: bool = False
    task_id: str | None = None
    warnings: list[str] = field(default_factory=list)
    # --- translation extras, read by CapabilityTable.apply ---
    route: str = "sdapi"                                        # "sdapi" | "generate"
    unsupported: dict[str, Any] = field(default_factory=dict)   # UNSUPPORTED_FIELDS as sent
    override_settings: dict[str, Any] = field(default_factory=dict)
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = field(default_factory=dict)
    mask_given: bool = False
    # --- resolved by CapabilityTable.apply ---
    timesteps: list[int] = field(default_factory=list)
    all_seeds: list[int] = field(default_factory=list)
    all_subseeds: list[int] = field(default_factory=list)
    clip_skip: int = 1
    max_and_prompts: int = 3
    applied: bool = False

    @property
    def image_count(self) -> int:
        return max(self.batch_size, 1) * max(self.n_iter, 1)

    def copy(self) -> GenerationRequest:
        """Shallow copy with its own warning and seed lists."""
        return dataclasses.replace(
            self, warnings=list(self.warnings), all_seeds=list(self.all_seeds),
            all_subseeds=list(self.all_subseeds), timesteps=list(self.timesteps),
        )

    def resolve_seeds(self) -> None:
        """Fill all_seeds / all_subseeds as A1111 (seed+i, or seed for all with a variation strength)."""
        count = self.image_count
        if len(self.all_seeds) == count and len(self.all_subseeds) == count:
            return
        self.seed = fixed_seed(parse_seed(self.seed, "seed"))
        self.subseed = fixed_seed(parse_seed(self.subseed, "subseed"))
        variation = self.subseed_strength != 0
        self.all_seeds = [self.seed if variation else self.seed + i for i in range(count)]
        self.all_subseeds = [self.subseed + i for i in range(count)]

    def resolved_timesteps(self) -> list[int]:
        """Timesteps chosen by the capability table (computed here if apply() was skipped)."""
        if self.timesteps:
            return list(self.timesteps)
        steps = min(max(self.steps or 4, 1), 4)
        if self.mode == "img2img":
            strength = self.denoising_strength if self.denoising_strength is not None else 0.75
            return img2img_timesteps(strength, steps)
        return txt2img_timesteps(steps)

    def image_jobs(self, width: int = 512, height: int = 512) -> list[ImageJob]:
        """One ImageJob per image: seeds resolved, init images resized and cycled over the batch."""
        self.resolve_seeds()
        width, height = self.width or width, self.height or height
        timesteps = self.resolved_timesteps()
        resized = [resize_image(img, self.resize_mode, width, height) for img in self.init_images]
        batch = max(self.batch_size, 1)
        jobs = []
        for i in range(self.image_count):
            init = resized[(i % batch) % len(resized)] if (self.mode == "img2img" and resized) else None
            jobs.append(
                ImageJob(
                    prompt=self.prompt, negative_prompt=self.negative_prompt,
                    seed=self.all_seeds[i], subseed=self.all_subseeds[i],
                    subseed_strength=float(self.subseed_strength), timesteps=list(timesteps),
                    cfg_scale=float(self.cfg_scale if self.cfg_scale is not None else 1.0),
                    init_image=init, emphasis=self.emphasis, max_and_prompts=self.max_and_prompts,
                )
            )
        return jobs


def parse_seed(value: Any, field_name: str = "seed") -> int:
    """-1/None/"" -> -1; an integer (or integral float / numeric string) -> int; else CapabilityError."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return -1
    if isinstance(value, bool):
        raise CapabilityError(field_name, f"{field_name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise CapabilityError(field_name, f"{field_name} must be an integer, got {value!r}")


def fixed_seed(seed: int) -> int:
    """A negative seed draws a random one in [0, 2^32); others are used as sent (A1111: seed+i, no wrap)."""
    return secrets.randbelow(SEED_RANGE) if seed < 0 else seed


def decode_init_images(values: Iterable[Any], field_name: str, max_pixels: int) -> list[Image.Image]:
    """Raw base64 or data-URI strings -> RGB images; undecodable -> RequestError 400 naming the item."""
    return [decode_init_image(value, f"{field_name}[{i}]", max_pixels) for i, value in enumerate(values)]


def decode_init_image(value: Any, name: str, max_pixels: int) -> Image.Image:
    """One raw base64 or data-URI string -> an RGB image; RequestError 400 naming `name` otherwise."""
    if not isinstance(value, str):
        raise RequestError(name, f"Invalid encoded image ({name}): expected a base64 string")
    try:
        return decode_image_b64(value, max_pixels)
    except ImageDecodeError as exc:
        raise RequestError(name, f"Invalid encoded image ({name}): {exc}") from exc


def _check_prompt(name: str, value: Any, settings: Settings) -> str:
    text = "" if value is None else value
    if isinstance(text, list):  # A1111 accepts a list internally; the first prompt is the prompt
        text = str(text[0]) if text else ""
    if not isinstance(text, str):
        raise RequestError(name, f"{name} must be a string")
    if len(text) > settings.max_prompt_chars:
        raise RequestError(
            name, f"{name} has {len(text)} characters; the limit is {settings.max_prompt_chars} "
            "(setting max_prompt_chars)"
        )
    return text


def _given(payload: Mapping[str, Any], fields_set: Iterable[str]) -> dict[str, Any]:
    """The fields the client explicitly sent with a non-null value."""
    return {k: payload[k] for k in fields_set if k in payload and payload[k] is not None}


def from_sdapi(
    mode: str, payload: Mapping[str, Any], fields_set: Iterable[str], settings: Settings
) -> GenerationRequest:
    """A1111 txt2img/img2img payload (model_dump of the protocol model) -> GenerationRequest."""
    sent = _with_infotext(_given(payload, fields_set))
    req = GenerationRequest(mode=mode, route="sdapi")
    _common_fields(req, sent, settings)
    sampler = sent.get("sampler_name") or sent.get("sampler_index")
    req.sampler_name = sampler if sampler else None
    req.scheduler = sent.get("scheduler") or None
    req.subseed = sent.get("subseed", -1)
    req.subseed_strength = float(sent.get("subseed_strength", 0.0))
    req.styles = list(sent.get("styles") or [])
    req.send_images = bool(sent.get("send_images", True))
    req.save_images = bool(sent.get("save_images", False))
    req.task_id = sent.get("force_task_id")
    req.override_settings = dict(sent.get("override_settings") or {})
    req.script_name = sent.get("script_name") or None
    req.alwayson_scripts = dict(sent.get("alwayson_scripts") or {})
    req.unsupported = {k: sent[k] for k in UNSUPPORTED_FIELDS if k in sent}
    if mode == "img2img":
        if payload.get("init_images") is None:
            raise RequestError("init_images", "Init image not found", status_code=404)
        req.init_images = decode_init_images(
            payload["init_images"], "init_images", settings.max_init_image_pixels
        )
        if not req.init_images:
            raise RequestError("init_images", "Init image not found", status_code=404)
        req.mask_given = bool(payload.get("mask")) or bool(payload.get("latent_mask"))
        req.denoising_strength = _float(sent, "denoising_strength", DEFAULT_DENOISING["sdapi"])
        req.resize_mode = _int(sent, "resize_mode", 0)
    return req


# A1111 `infotext` request field: values parsed from it fill the fields the request did not set.
INFOTEXT_FIELDS = {
    "Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "Seed": "seed",
    "CFG scale": "cfg_scale", "Size-1": "width", "Size-2": "height", "Sampler": "sampler_name",
    "Schedule type": "scheduler", "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
    "Denoising strength": "denoising_strength",
}


def _with_infotext(sent: dict[str, Any]) -> dict[str, Any]:
    text = sent.get("infotext")
    if not isinstance(text, str) or not text.strip():
        return sent
    from .infotext import parse_generation_parameters  # infotext imports this module

    parsed = parse_generation_parameters(text)
    filled = {
        field: parsed[key] for key, field in INFOTEXT_FIELDS.items() if parsed.get(key) not in (None, "")
    }
    return {**filled, **sent}


def from_generate(
    payload: Mapping[str, Any], fields_set: Iterable[str], settings: Settings
) -> GenerationRequest:
    """Upstream `/generate` payload -> GenerationRequest (mode and prompt required; PNG output)."""
    sent = _given(payload, fields_set)
    mode = sent.get("mode")
    if mode not in MODES:
        raise RequestError("mode", f"mode is required and must be 'txt2img' or 'img2img', got {mode!r}")
    if not isinstance(sent.get("prompt"), str) or not sent["prompt"].strip():
        raise RequestError("prompt", "prompt is required and must be a non-empty string")
    req = GenerationRequest(mode=mode, route="generate", samples_format="png")
    _common_fields(req, sent, settings)
    req.sampler_name = sent.get("sampler_name") or None
    req.task_id = sent.get("task_id")
    req.save_images = settings.save_outputs
    if mode == "img2img":
        init = sent.get("init_image")
        if not init and sent.get("init_images"):
            init = sent["init_images"][0]
        if not init:
            raise RequestError("init_image", "init_image (base64) is required for img2img")
        req.init_images = [decode_init_image(init, "init_image", settings.max_init_image_pixels)]
        strength = sent.get("denoising_strength", sent.get("strength"))
        req.denoising_strength = DEFAULT_DENOISING["generate"] if strength is None else _as_float(
            strength, "denoising_strength"
        )
        req.resize_mode = _int(sent, "resize_mode", 0)
    return req


def _common_fields(req: GenerationRequest, sent: dict[str, Any], settings: Settings) -> None:
    req.prompt = _check_prompt("prompt", sent.get("prompt"), settings)
    req.negative_prompt = _check_prompt("negative_prompt", sent.get("negative_prompt"), settings)
    req.width = _int(sent, "width", None)
    req.height = _int(sent, "height", None)
    req.steps = _int(sent, "steps", None)
    req.cfg_scale = _float(sent, "cfg_scale", None)
    req.seed = sent.get("seed", -1)
    req.batch_size = _int(sent, "batch_size", 1)
    req.n_iter = _int(sent, "n_iter", 1)
    req.max_and_prompts = settings.max_and_prompts


def _as_float(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise RequestError(name, f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise RequestError(name, f"{name} must be a finite number, got {value!r}")
    return number


def _float(sent: Mapping[str, Any], name: str, default: float | None) -> float | None:
    return default if name not in sent else _as_float(sent[name], name)


def _int(sent: Mapping[str, Any], name: str, default: int | None) -> int | None:
    if name not in sent:
        return default
    number = _as_float(sent[name], name)
    if not number.is_integer():
        raise RequestError(name, f"{name} must be an integer, got {sent[name]!r}")
    return int(number)
