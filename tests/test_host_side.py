"""Host side: the fast PNG writer gives PIL's pixels and infotext in fewer CPU cycles, and a
finished request leaves nothing of itself in memory."""

from __future__ import annotations

import base64
import gc
import io
import socket
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image, PngImagePlugin

from pi_axera_sd_service.api.app import create_app
from pi_axera_sd_service.api.server import server_config
from pi_axera_sd_service.pipeline.images import encode_image, read_infotext
from pi_axera_sd_service.service.engine import Engine


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


def _lists_holding(value: str, mine: list) -> int:
    """Lists alive in this process (besides `mine`) that hold a string equal to `value`."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, list) and obj is not mine and value in obj)


def test_a_finished_request_keeps_nothing_of_its_body(settings_factory, demo_models):
    """The served app (our uvicorn config) at log level WARNING: once answered, no parsed body stays
    referenced. Timers armed at the end of a response used to keep the request's context, its log
    record and the whole body alive until they fired (RSS grew by request rate x body size x 10 s),
    and an idle keep-alive connection kept its last request's scope, and the body in it."""
    settings = settings_factory(log_level="WARNING", header_timeout=120.0, keep_alive_timeout=120.0)
    engine = Engine(settings, models=demo_models)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(settings, create_app(settings, engine)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.02)
        marker = "a style " + uuid.uuid4().hex
        payload = {"prompt": "a fox", "styles": [marker], "steps": 1, "cfg_scale": 1, "seed": 1}
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as client:
            for _ in range(3):  # one keep-alive connection: its timers are re-armed after each answer
                assert client.post("/sdapi/v1/txt2img", json=payload).status_code == 200
            deadline = time.monotonic() + 5.0
            while _lists_holding(marker, payload["styles"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _lists_holding(marker, payload["styles"]) == 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.mark.parametrize("accelerated", [True, False])
def test_images_in_and_out_are_the_same_with_or_without_the_fast_codecs(monkeypatch, accelerated):
    """pybase64 and ISA-L are optional speed-ups: without them the same bytes, pixels and errors."""
    from pi_axera_sd_service.pipeline import images

    if not accelerated:
        monkeypatch.setattr(images, "pybase64", None)
        monkeypatch.setattr(images, "isal_zlib", None)
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), "RGB")
    png = encode_image(image, "png", "Steps: 4", png_compress_level=1)
    assert Image.open(io.BytesIO(png)).tobytes() == image.tobytes()
    text = images.b64encode_text(png)
    assert text == base64.b64encode(png).decode("ascii")
    wrapped = "data:image/png;base64," + "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    for sent in (text, text.rstrip("="), wrapped):
        assert images.decode_image_b64(sent, 10**6).tobytes() == image.tobytes()
    for bad, wording in (("ab!c", "Only base64 data is allowed"), ("aGVsé", "only ASCII characters")):
        with pytest.raises(images.ImageDecodeError, match=wording):
            images.decode_image_b64(bad, 10**6)
