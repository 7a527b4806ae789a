"""pi_axera_sd_interactive (Gradio app) AxeraClient.generate, replayed."""

from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image

from compat_tests.helpers import (
    MODEL_SIZE,
    assert_structured_answer,
    inject_images,
    interrogation_available,
    load_payload,
)

pytestmark = pytest.mark.client("pi_axera_sd_interactive")

TIMEOUT = 60  # api_client.py


def _generate(target, body):
    r = requests.post(target.url("/generate"), json=body, auth=target.auth, timeout=TIMEOUT)
    r.raise_for_status()
    data = r.json()
    assert data["status"] == "ok", f"the app would show error: {data.get('error')}"
    img = Image.open(io.BytesIO(base64.b64decode(data["base64"])))
    assert img.size == MODEL_SIZE
    seed, total, text = data["seed"], data["total_time_ms"], data["text_time_ms"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    assert 0 < total < TIMEOUT * 1000 and 0 <= text <= total, f"timings total={total} text={text}"
    return data


def test_txt2img_seed(target):
    data = _generate(target, load_payload("pi_interactive_generate_txt2img")["body"])
    assert data["seed"] == 42


def test_txt2img_random_seed(target):
    a = _generate(target, {"mode": "txt2img", "prompt": "a lighthouse in a storm", "seed": -1})["seed"]
    b = _generate(target, {"mode": "txt2img", "prompt": "a lighthouse in a storm", "seed": -1})["seed"]
    assert a != b, "seed -1 gave the same seed twice"


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.75, 1.0])
def test_img2img_strength(target, init_image, strength):
    body = load_payload("pi_interactive_generate_img2img")["body"]
    body = dict(body, denoising_strength=strength, resize_mode=0)
    assert _generate(target, inject_images(body, init_image))["seed"] == 42


@pytest.mark.parametrize("resize_mode", [0, 1, 2], ids=["stretch", "crop", "pad"])
def test_img2img_resize_mode(target, init_image, resize_mode):
    body = dict(load_payload("pi_interactive_generate_img2img")["body"], resize_mode=resize_mode)
    _generate(target, inject_images(body, init_image))


def test_img2img_resize_modes_differ(target, init_image):
    """Stretch, crop and pad of a non-square picture give three different images."""
    body = inject_images(load_payload("pi_interactive_generate_img2img")["body"], init_image)
    images = {
        mode: _generate(target, dict(body, resize_mode=mode, denoising_strength=0.25))["base64"]
        for mode in (0, 1, 2)
    }
    assert len(set(images.values())) == 3


CATEGORIES = {"colour": ["red", "green", "blue"], "place": ["forest", "ocean", "house"]}


def _interrogate(target, path, body):
    """The app's interrogate modes: requests, 30 s timeout, the JSON shown as-is."""
    r = requests.post(target.url(path), json=body, auth=target.auth, timeout=30)
    r.raise_for_status()
    return r.json()


def test_interrogate_standard_and_structured_modes(target):
    if not interrogation_available(target):
        pytest.skip("this deployment has no CLIP models (interrogation off)")
    buffer = io.BytesIO()
    Image.new("RGB", (200, 150), (25, 45, 200)).save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    standard = _interrogate(target, "/sdapi/v1/interrogate", {"image": b64})  # "Standard": no model key
    assert isinstance(standard["caption"], str) and standard["caption"]
    assert all(0.0 <= item["score"] <= 1.0 for item in standard["interrogations"])
    body = {"image": b64, "categories": CATEGORIES}
    structured = _interrogate(target, "/sdapi/v1/interrogate/structured", body)
    assert_structured_answer(structured, CATEGORIES)
    if target.demo:
        assert standard["interrogations"][0]["tag"] == "blue"
        assert structured["results"]["colour"]["winner"] == "blue"
