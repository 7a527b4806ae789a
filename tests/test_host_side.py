"""Host-side encoders: the fast PNG writer gives PIL's pixels and infotext, in fewer CPU cycles."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pi_axera_sd_service.pipeline.images import encode_image, read_infotext


def pil_png(image: Image.Image, text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


@pytest.mark.parametrize("text", ["a fox\nSteps: 4, Seed: 7", "ein Fuchs über dem Schnee, 狐\nSteps: 4"])
@pytest.mark.parametrize("level", [0, 1, 6])
def test_png_has_the_pixels_and_infotext_pil_would_write(text, level):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    pixels[::2] = pixels[0]    # rows where the Up filter gives zeros
    image = Image.fromarray(pixels, "RGB")
    ours = encode_image(image, "png", text, png_compress_level=level)
    decoded = Image.open(io.BytesIO(ours))
    reference = Image.open(io.BytesIO(pil_png(image, text)))
    assert decoded.mode == "RGB" and decoded.size == (40, 48)
    assert decoded.tobytes() == reference.tobytes() == image.tobytes()
    assert decoded.info["parameters"] == reference.info["parameters"] == text
    assert read_infotext(ours) == text


def test_png_without_infotext_and_other_modes_still_encode():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L")
    assert Image.open(io.BytesIO(encode_image(gray, "png", None))).tobytes() == gray.tobytes()
    rgb = Image.new("RGB", (3, 2), (10, 200, 30))
    decoded = Image.open(io.BytesIO(encode_image(rgb, "png", None)))
    assert decoded.tobytes() == rgb.tobytes() and "parameters" not in decoded.info
