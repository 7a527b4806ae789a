"""The OpenAI images API body -> GenerationRequest (POST /v1/images/generations and /v1/images/edits).

A translator beside `from_sdapi` / `from_generate` (service/request.py), built on their public
helpers: OpenAI's names map onto the one internal request (`n` -> batch_size, `size` ->
width/height, `output_format` -> samples_format, `output_compression` -> the request's jpeg_quality
override, `strength` -> denoising_strength); the capability table then chooses the defaults and
clamps or rejects as for every route.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..settings import Settings
from .errors import RequestError
from .request import (
    GenerationRequest,
    common_fields,
    decode_init_images,
    float_field,
    given_fields,
    int_field,
    require_prompt,
)

OUTPUT_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
QUALITY_NO_EFFECT = {"auto", "standard"}  # OpenAI's defaults: nothing to warn about
SD_EXTRAS = ("prompt", "negative_prompt", "steps", "cfg_scale", "seed")  # same names as /sdapi
_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def from_openai(
    mode: str,
    payload: Mapping[str, Any],
    fields_set: Iterable[str],
    settings: Settings,
    *,
    unknown: Iterable[str] = (),
    images: Sequence[bytes | str] = (),
) -> GenerationRequest:
    """OpenAI images body (model_dump of the protocol model) -> GenerationRequest.

    `unknown`: body fields OpenAI's schema lacks (ignored with a warning); `images`: the edit's
    uploads (file bytes, or base64 text), image[0], image[1], ... in errors. RequestError (400)
    names the field."""
    sent = given_fields(payload, fields_set)
    require_prompt(sent)
    if sent.get("stream"):
        raise RequestError("stream", "stream is not supported: leave it out or send false")
    if sent.get("mask") is not None:
        raise RequestError("mask", "mask is not supported: inpainting is not available on this service")
    _check_response_format(sent.get("response_format"))
    n = int_field(sent, "n", 1) or 0
    if n < 1:
        raise RequestError("n", f"n must be at least 1, got {n}")
    width, height = _size(sent.get("size"))
    samples_format, quality_override, format_warnings = _output_format(sent)
    fields: dict[str, Any] = dict(
        common_fields({k: sent[k] for k in SD_EXTRAS if k in sent}, settings),
        mode=mode, width=width, height=height, batch_size=n, samples_format=samples_format,
        override_settings=quality_override,
        warnings=[*(f"unknown parameter '{name}' ignored" for name in unknown), *format_warnings,
                  *_ignored_options(sent)],
    )
    if mode == "img2img":
        if not images:
            raise RequestError("image", "image is required: upload one image file (field image or image[])")
        size = (width, height) if width and height else None
        fields["init_images"] = decode_init_images(images[:n], "image", settings, size)
        if len(images) > n:
            fields["warnings"].append(f"image: {len(images)} images sent for n={n}; the first {n} were used")
        fields["denoising_strength"] = float_field(sent, "strength", None)  # None: the table's default
    return GenerationRequest(**fields)


def _check_response_format(value: Any) -> None:
    if value in (None, "b64_json"):
        return
    if value == "url":
        raise RequestError("response_format", "response_format 'url' is not supported: this service keeps "
                           "no image files to serve; send 'b64_json' (the default here)")
    raise RequestError("response_format", f"response_format must be 'b64_json', got {value!r}")


def _size(value: Any) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H); None or 'auto' -> (None, None), the models' size."""
    if value is None or str(value).strip().lower() == "auto":
        return None, None
    match = _SIZE.fullmatch(str(value))
    if match is None:
        raise RequestError("size", f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {value!r}")
    return int(match.group(1)), int(match.group(2))


def _output_format(sent: Mapping[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """(samples_format, override_settings, warnings): output_compression is the per-request form of
    the jpeg_quality option (the plan's jpeg_quality, used for jpeg and webp)."""
    fmt = str(sent.get("output_format", "png")).lower()
    if fmt not in OUTPUT_FORMATS:
        raise RequestError("output_format", f"output_format must be png, jpeg or webp, got {fmt!r}")
    quality = int_field(sent, "output_compression", None)
    if quality is None:
        return OUTPUT_FORMATS[fmt], {}, []
    if not 0 <= quality <= 100:
        raise RequestError("output_compression", f"output_compression must be in 0–100, got {quality}")
    if OUTPUT_FORMATS[fmt] == "png":
        return "png", {}, ["output_compression applies to jpeg and webp only; ignored for png"]
    return OUTPUT_FORMATS[fmt], {"jpeg_quality": max(quality, 1)}, []


def _ignored_options(sent: Mapping[str, Any]) -> list[str]:
    """Warnings for OpenAI options that cannot apply to these models (model and user are silent)."""
    warnings = []
    quality = sent.get("quality")
    if quality is not None and str(quality).lower() not in QUALITY_NO_EFFECT:
        warnings.append(f"quality '{quality}' has no effect on the fixed LCM models; ignored (steps 1–4 "
                        "set the detail)")
    if sent.get("style") is not None:
        warnings.append(f"style '{sent['style']}' is not supported; ignored")
    if str(sent.get("background", "")).lower() == "transparent":
        warnings.append("background 'transparent' is not supported; the images are opaque")
    return warnings
