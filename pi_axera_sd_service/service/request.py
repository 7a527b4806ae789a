"""GenerationRequest: what a client asked for, translated from its route; nothing resolved yet.

One translator per way in (`from_sdapi`, `from_generate`, `from_cli`; `from_openai` in
openai_request.py builds on the public helpers here) is where the routes differ
(defaults, aliases, data-URI stripping). `CapabilityTable.apply` then turns the request into the
frozen GenerationPlan that runs. None means "not sent: the table's default, never a warning".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..pipeline.images import ImageDecodeError, PixelBudget, decode_image_b64, decode_image_bytes
from ..pipeline.prompt_parser import PromptError, check_prompt_text
from ..settings import Settings
from .errors import RequestError
from .infotext import parse_generation_parameters

UPSTREAM_DENOISING_STRENGTH = 0.5   # /generate and the upstream img2img script (timesteps 499, 259)
MODES = ("txt2img", "img2img")
# A1111 fields that are not supported but need a policy decision (see capabilities.py).
UNSUPPORTED_FIELDS = (
    "enable_hr", "restore_faces", "tiling", "styles", "clip_skip", "seed_resize_from_w", "seed_resize_from_h",
)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request as the client sent it, whatever the route."""

    mode: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: Any = -1                        # as sent: -1, None, "" (random), an int or a numeric string
    subseed: Any = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    scheduler: str | None = None
    cfg_scale: float | None = None
    batch_size: int = 1
    n_iter: int = 1
    denoising_strength: float | None = None
    resize_mode: int = 0
    init_images: tuple[Image.Image, ...] = ()
    samples_format: str | None = None     # None: the options' samples_format (A1111); else fixed
    send_images: bool = True
    save_images: bool = False
    task_id: str | None = None
    warnings: tuple[str, ...] = ()        # from translation
    unsupported: Mapping[str, Any] = field(default_factory=dict)   # UNSUPPORTED_FIELDS as sent
    override_settings: Mapping[str, Any] = field(default_factory=dict)
    script_name: str | None = None
    alwayson_scripts: Mapping[str, Any] = field(default_factory=dict)
    mask_given: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_images", tuple(self.init_images))
        object.__setattr__(self, "warnings", tuple(self.warnings))


def decode_init_images(
    values: Iterable[Any], field_name: str, settings: Settings, target_size: tuple[int, int] | None
) -> list[Image.Image]:
    """Raw base64 or data-URI strings -> RGB images; undecodable -> RequestError 400 naming the item.

    All of one request's images share one pixel budget (max_request_pixels); a JPEG is decoded at
    the smallest scale that still covers `target_size` (the size asked for)."""
    budget = PixelBudget(settings.max_request_pixels)
    return [decode_init_image(value, f"{field_name}[{i}]", settings, target_size, budget)
            for i, value in enumerate(values)]


def decode_init_image(
    value: Any, name: str, settings: Settings, target_size: tuple[int, int] | None = None,
    budget: PixelBudget | None = None,
) -> Image.Image:
    """One raw base64 or data-URI string (or an uploaded file's bytes) -> an RGB image; RequestError
    400 naming `name` otherwise."""
    if not isinstance(value, (str, bytes)):
        raise RequestError(name, f"Invalid encoded image ({name}): expected a base64 string")
    decode = decode_image_bytes if isinstance(value, bytes) else decode_image_b64
    try:
        return decode(value, settings.max_init_image_pixels, target_size,  # type: ignore[arg-type]
                      budget or PixelBudget(settings.max_request_pixels))
    except ImageDecodeError as exc:
        raise RequestError(name, f"Invalid encoded image ({name}): {exc}") from exc


def _asked_size(payload: Mapping[str, Any]) -> tuple[int, int] | None:
    """(width, height) the request asks for, when both are whole numbers (a JPEG decode target)."""
    size = payload.get("width"), payload.get("height")
    return size if all(isinstance(v, int) and v > 0 for v in size) else None  # type: ignore[return-value]


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
    try:
        check_prompt_text(text, name)  # also for prompts filled in from `infotext`
    except PromptError as exc:
        raise RequestError(name, str(exc)) from None
    return text


def given_fields(payload: Mapping[str, Any], fields_set: Iterable[str]) -> dict[str, Any]:
    """The fields the client explicitly sent with a non-null value (every translator starts here)."""
    return {k: payload[k] for k in fields_set if k in payload and payload[k] is not None}


def from_sdapi(
    mode: str, payload: Mapping[str, Any], fields_set: Iterable[str], settings: Settings
) -> GenerationRequest:
    """A1111 txt2img/img2img payload (model_dump of the protocol model) -> GenerationRequest."""
    sent = _with_infotext(given_fields(payload, fields_set))
    sampler = sent.get("sampler_name") or sent.get("sampler_index")
    fields: dict[str, Any] = dict(
        common_fields(sent, settings), mode=mode, sampler_name=sampler or None,
        scheduler=sent.get("scheduler") or None, subseed=sent.get("subseed", -1),
        subseed_strength=float_field(sent, "subseed_strength", 0.0),
        send_images=bool(sent.get("send_images", True)), save_images=bool(sent.get("save_images", False)),
        task_id=sent.get("force_task_id"), override_settings=dict(sent.get("override_settings") or {}),
        script_name=sent.get("script_name") or None,
        alwayson_scripts=dict(sent.get("alwayson_scripts") or {}),
        unsupported={k: sent[k] for k in UNSUPPORTED_FIELDS if k in sent},
    )
    if mode == "img2img":
        images, warning = _used_init_images(payload.get("init_images"), fields["batch_size"], settings,
                                            _asked_size(payload))
        fields.update(
            warnings=[warning] if warning else [],
            init_images=images, mask_given=bool(payload.get("mask")) or bool(payload.get("latent_mask")),
            denoising_strength=float_field(sent, "denoising_strength", None),
            resize_mode=int_field(sent, "resize_mode", 0),
        )
    return GenerationRequest(**fields)


def _used_init_images(
    values: Any, batch_size: int, settings: Settings, target_size: tuple[int, int] | None
) -> tuple[list[Image.Image], str | None]:
    """The init images the batch uses, decoded; only those are decoded (a request's memory is bounded).

    A1111 repeats one init image over the batch and refuses more images than `batch_size`
    (RuntimeError "bad number of images passed", a 500): here that is a 400 naming the field, before
    any image is decoded. At most `max_images_per_request` are decoded (the batch is clamped to it);
    images past that are never used, so they are skipped with a warning."""
    if not values:   # None (A1111's 404) or an empty list
        raise RequestError("init_images", "Init image not found", status_code=404)
    if not isinstance(values, list):
        raise RequestError("init_images", "init_images must be a list of base64 images")
    batch = max(batch_size, 1)
    if len(values) > batch:
        raise RequestError("init_images", f"init_images has {len(values)} images but batch_size is {batch}; "
                           "send one image (repeated over the batch) or at most batch_size images")
    used = min(len(values), settings.max_images_per_request)
    warning = None
    if used < len(values):
        warning = (f"init_images: {len(values)} images sent, the batch is limited to "
                   f"{settings.max_images_per_request} (max_images_per_request); the rest were not used")
    return decode_init_images(values[:used], "init_images", settings, target_size), warning


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
    parsed = parse_generation_parameters(text)
    filled = {
        field: parsed[key] for key, field in INFOTEXT_FIELDS.items() if parsed.get(key) not in (None, "")
    }
    return {**filled, **sent}


def from_generate(
    payload: Mapping[str, Any], fields_set: Iterable[str], settings: Settings
) -> GenerationRequest:
    """Upstream `/generate` payload -> GenerationRequest (mode and prompt required; PNG output)."""
    sent = given_fields(payload, fields_set)
    mode = sent.get("mode")
    if mode not in MODES:
        raise RequestError("mode", f"mode is required and must be 'txt2img' or 'img2img', got {mode!r}")
    require_prompt(sent)
    fields: dict[str, Any] = dict(
        common_fields(sent, settings), mode=mode, samples_format="png",
        sampler_name=sent.get("sampler_name") or None, task_id=sent.get("task_id"),
        save_images=settings.save_outputs,
    )
    if mode == "img2img":
        init = sent.get("init_image")
        if not init and sent.get("init_images"):
            init = sent["init_images"][0]
        if not init:
            raise RequestError("init_image", "init_image (base64) is required for img2img")
        strength = sent.get("denoising_strength", sent.get("strength"))
        fields.update(
            init_images=[decode_init_image(init, "init_image", settings, _asked_size(sent))],
            denoising_strength=UPSTREAM_DENOISING_STRENGTH if strength is None else _as_float(
                strength, "denoising_strength"),
            resize_mode=int_field(sent, "resize_mode", 0),
        )
    return GenerationRequest(**fields)


def from_cli(
    settings: Settings,
    *,
    prompt: str,
    negative_prompt: str = "",
    seed: int | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    init_image: Image.Image | None = None,
    denoising_strength: float | None = None,
    resize_mode: int = 0,
) -> GenerationRequest:
    """`pi-axera-sd generate` and python/run_*.py -> GenerationRequest (as /generate: PNG, same defaults)."""
    sent = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
            "cfg_scale": cfg_scale}
    fields: dict[str, Any] = dict(
        common_fields({k: v for k, v in sent.items() if v is not None}, settings),
        mode="img2img" if init_image is not None else "txt2img", samples_format="png", send_images=False,
    )
    if init_image is not None:
        strength = UPSTREAM_DENOISING_STRENGTH if denoising_strength is None else denoising_strength
        fields.update(init_images=[init_image], resize_mode=resize_mode, denoising_strength=strength)
    return GenerationRequest(**fields)


def require_prompt(sent: Mapping[str, Any]) -> None:
    """RequestError (400) unless `prompt` was sent as a non-empty string (/generate, OpenAI)."""
    if not isinstance(sent.get("prompt"), str) or not sent["prompt"].strip():
        raise RequestError("prompt", "prompt is required and must be a non-empty string")


def common_fields(sent: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The GenerationRequest fields every route sends under the same names, checked (prompts, numbers)."""
    return dict(
        prompt=_check_prompt("prompt", sent.get("prompt"), settings),
        negative_prompt=_check_prompt("negative_prompt", sent.get("negative_prompt"), settings),
        width=int_field(sent, "width", None), height=int_field(sent, "height", None),
        steps=int_field(sent, "steps", None), cfg_scale=float_field(sent, "cfg_scale", None),
        seed=sent.get("seed", -1),
        batch_size=int_field(sent, "batch_size", 1), n_iter=int_field(sent, "n_iter", 1),
    )


def _as_float(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise RequestError(name, f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise RequestError(name, f"{name} must be a finite number, got {value!r}")
    return number


def float_field(sent: Mapping[str, Any], name: str, default: float | None) -> float | None:
    """`sent[name]` as a finite float (`default` when not sent); RequestError (400) naming it otherwise."""
    return default if name not in sent else _as_float(sent[name], name)


def int_field(sent: Mapping[str, Any], name: str, default: int | None) -> int | None:
    """`sent[name]` as an integer (`default` when not sent); RequestError (400) naming it otherwise."""
    if name not in sent:
        return default
    number = _as_float(sent[name], name)
    if not number.is_integer():
        raise RequestError(name, f"{name} must be an integer, got {sent[name]!r}")
    return int(number)
