"""A1111 infotext: `create_infotext` (format and quoting of processing.py) and `parse_generation_parameters`.

Format: "{prompt}\\nNegative prompt: {neg}\\n{k: v, ...}" (the negative line only when non-empty),
values JSON-quoted when they contain ',', '\\n' or ':'. Parsing follows infotext_utils.py.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import re
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..pipeline.images import ImageDecodeError, read_infotext
from ..pipeline.prompt_parser import parse_prompt_attention
from .errors import RequestError

PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
DATA_URI_RE = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


@functools.cache
def service_version() -> str:
    """The version reported in infotexts and `info.version` (read once: ≈1.5 ms per metadata read)."""
    try:
        return "pi_axera_sd_service-" + metadata.version("pi_axera_sd_service")
    except metadata.PackageNotFoundError:
        return "pi_axera_sd_service"


def quote(value: Any) -> str:
    """A1111 `quote`: unchanged unless it holds ',', newline or ':', then a JSON string (non-ASCII kept)."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """Inverse of `quote` for a JSON-quoted value; anything else is returned unchanged."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def create_infotext(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    scheduler_label: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None,
    model_name: str | None,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    denoising_strength: float | None = None,
    clip_skip: int = 1,
    extra: Mapping[str, Any] | None = None,
    version: str | None = None,
) -> str:
    """The infotext of one image, in A1111's key order; None values are left out."""
    params: dict[str, Any] = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": scheduler_label,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash or None,
        "Model": model_name or None,
        "Variation seed": subseed if subseed_strength else None,
        "Variation seed strength": subseed_strength if subseed_strength else None,
        "Denoising strength": denoising_strength,
        "Clip skip": clip_skip if clip_skip > 1 else None,
    }
    params.update(extra or {})
    params["Version"] = version if version is not None else service_version()
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _uses_emphasis(prompt: str, negative_prompt: str) -> bool:
    parts = parse_prompt_attention(prompt) + parse_prompt_attention(negative_prompt)
    return any(weight != 1.0 and text != "BREAK" for text, weight in parts)


_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}


def parse_generation_parameters(text: str) -> dict[str, Any]:
    """A1111 `parse_generation_parameters`: Prompt, Negative prompt, every `k: v`, WxH split, defaults."""
    res: dict[str, Any] = {}
    prompt, negative_prompt = "", ""
    done_with_prompt = False
    *lines, last_line = (text or "").strip().split("\n")
    if len(PARAM_RE.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for key, value in PARAM_RE.findall(last_line):
        if not value:  # A1111 fails on v[0] and skips the key
            continue
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = IMAGE_SIZE_RE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for key, default in _DEFAULTS.items():
        res.setdefault(key, default)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    if "Emphasis" not in res and _uses_emphasis(prompt, negative_prompt):
        res["Emphasis"] = "Original"
    return res


def png_info(image_b64: str) -> dict[str, Any]:
    """POST /sdapi/v1/png-info: {info, items, parameters} from a raw base64 or data-URI image."""
    text = DATA_URI_RE.sub("", "".join((image_b64 or "").split()))
    if not text:
        return {"info": "", "items": {}, "parameters": {}}
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        info = read_infotext(raw)
        with Image.open(io.BytesIO(raw)) as img:
            items = {k: v for k, v in img.info.items() if isinstance(v, str) and k != "parameters"}
    except (binascii.Error, ValueError, ImageDecodeError, UnidentifiedImageError, OSError) as exc:
        raise RequestError("image", f"Invalid encoded image: {exc}") from exc
    return {"info": info, "items": items, "parameters": parse_generation_parameters(info) if info else {}}
