"""The OpenAI images API body -> GenerationRequest (POST /v1/images/generations and /v1/images/edits).

A translator beside `from_sdapi` / `from_generate` (service/request.py): OpenAI's names map onto the
one internal request (`n` -> batch_size, `size` -> width/height, `output_format` -> samples_format,
`strength` -> denoising_strength); the capability table then clamps or rejects as for every route.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image

from ..pipeline.images import ImageDecodeError, decode_image_bytes
from ..settings import Settings
from .request import (
    DEFAULT_DENOISING,
    GenerationRequest,
    RequestError,
    _common_fields,
    _given,
    _int,
    decode_init_image,
)

OUTPUT_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
QUALITY_NO_EFFECT = {"auto", "standard"}  # OpenAI's defaults: nothing to warn about
_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def from_openai(
    mode: str,
    payload: Mapping[str, Any],
    fields_set: Iterable[str],
    settings: Settings,
    *,
    unknown: Iterable[str] = (),
    images: Sequence[tuple[str, bytes | str]] = (),
) -> GenerationRequest:
    """OpenAI images body (model_dump of the protocol model) -> GenerationRequest.

    `unknown`: body fields OpenAI's schema lacks (ignored with a warning); `images`: the edit's
    uploads as (field name, file bytes or a base64 string). RequestError (400) names the field."""
    sent = _given(payload, fields_set)
    if not isinstance(sent.get("prompt"), str) or not sent["prompt"].strip():
        raise RequestError("prompt", "prompt is required and must be a non-empty string")
    if sent.get("stream"):
        raise RequestError("stream", "stream is not supported: leave it out or send false")
    if sent.get("mask") is not None:
        raise RequestError("mask", "mask is not supported: inpainting is not available on this service")
    _check_response_format(sent.get("response_format"))
    n = _int(sent, "n", 1)
    if n is None or n < 1:
        raise RequestError("n", f"n must be at least 1, got {n}")
    width, height = _size(sent.get("size"))
    fields = {k: sent[k] for k in ("prompt", "negative_prompt", "steps", "cfg_scale", "seed") if k in sent}
    fields.update(batch_size=n, **({"width": width, "height": height} if width is not None else {}))

    req = GenerationRequest(mode=mode, route="openai")
    _common_fields(req, fields, settings)
    req.warnings += [f"unknown parameter '{name}' ignored" for name in unknown]
    _output_format(req, sent)
    req.warnings += _ignored_options(sent)
    if mode == "img2img":
        if not images:
            raise RequestError("image", "image is required: upload one image file (field image or image[])")
        req.init_images = [_decode(name, data, settings.max_init_image_pixels) for name, data in images]
        if len(images) > n:
            req.warnings.append(f"image: {len(images)} images sent for n={n}; the first {n} were used")
        strength = sent.get("strength", DEFAULT_DENOISING["sdapi"])
        req.denoising_strength = float(strength)
    return req


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


def _output_format(req: GenerationRequest, sent: Mapping[str, Any]) -> None:
    """output_format -> samples_format; output_compression -> the jpeg/webp quality of this request."""
    fmt = str(sent.get("output_format", "png")).lower()
    if fmt not in OUTPUT_FORMATS:
        raise RequestError("output_format", f"output_format must be png, jpeg or webp, got {fmt!r}")
    req.samples_format = OUTPUT_FORMATS[fmt]
    quality = sent.get("output_compression")
    if quality is None:
        return
    if not 0 <= quality <= 100:
        raise RequestError("output_compression", f"output_compression must be in 0–100, got {quality}")
    if req.samples_format == "png":
        req.warnings.append("output_compression applies to jpeg and webp only; ignored for png")
    else:  # the per-request form of the jpeg_quality option (read by the capability table)
        req.override_settings["jpeg_quality"] = max(int(quality), 1)


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


def _decode(name: str, data: bytes | str, max_pixels: int) -> Image.Image:
    """One uploaded file (bytes) or base64 text field -> an RGB image; RequestError 400 naming it."""
    if isinstance(data, str):
        return decode_init_image(data, name, max_pixels)
    try:
        return decode_image_bytes(data, max_pixels)
    except ImageDecodeError as exc:
        raise RequestError(name, f"Invalid image ({name}): {exc}") from exc
