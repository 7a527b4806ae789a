"""automatic1111_pico_passthrough: the Pico's JSON passed through unchanged."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from compat_tests.helpers import load_payload, warnings_about

pytestmark = pytest.mark.client("pico passthrough")


def test_txt2img_240_to_rgb565(target):
    payload = load_payload("pico_passthrough_txt2img")
    auth = httpx.BasicAuth(*target.auth) if target.auth else None
    with httpx.Client(timeout=60, auth=auth) as client:  # A1111_TIMEOUT=60
        r = client.post(target.url("/sdapi/v1/txt2img"), json=payload["body"])
        r.raise_for_status()
    body = r.json()
    img = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))  # raw base64 required
    img = img.convert("RGB").resize((240, 240), Image.LANCZOS)
    inverted = bytes(255 - b for b in img.tobytes())
    rgb565 = bytearray()
    for i in range(0, len(inverted), 3):
        r8, g8, b8 = inverted[i : i + 3]
        value = ((r8 >> 3) << 11) | ((g8 >> 2) << 5) | (b8 >> 3)
        rgb565 += value.to_bytes(2, "big")
    assert len(rgb565) == 115200

    warnings = json.loads(body["info"]).get("warnings", [])
    for field in ("width", "height", "steps"):
        assert warnings_about(warnings, field), f"no warning about {field}: {warnings}"
