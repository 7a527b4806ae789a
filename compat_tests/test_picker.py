"""picker (hardware_exercises picker/sd_client.py): POST /generate via urllib."""

from __future__ import annotations

import base64
import io
import json
import urllib.request

import pytest
from PIL import Image

from compat_tests.helpers import (
    MODEL_SIZE,
    assert_structured_answer,
    inject_images,
    interrogation_available,
    load_payload,
    make_init_image,
    png_b64,
)

pytestmark = pytest.mark.client("picker")

TIMEOUT = 30  # sd_client.py


def _generate_image(target, body):
    """generate_image(): urllib, 30 s timeout, images[0] else image else base64, plain b64decode.

    The client's contract is its socket timeout: urlopen raises if the server is silent for 30 s, which fails
    the test. Total wall time is not the client's contract, so it is not asserted (a loaded machine is slow).
    """
    headers = {"Content-Type": "application/json"}
    if target.auth:
        headers["Authorization"] = target.basic_header()
    req = urllib.request.Request(target.url("/generate"), data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        data = json.loads(resp.read())
    if isinstance(data.get("images"), list) and data["images"]:
        b64 = data["images"][0]
    elif data.get("image"):
        b64 = data["image"]
    elif data.get("base64"):
        b64 = data["base64"]
    else:
        raise RuntimeError("No images returned from SD API")
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img, data


def test_txt2img(target):
    img, data = _generate_image(target, load_payload("picker_generate_txt2img")["body"])
    assert img.size == MODEL_SIZE, "the picker would resize a wrong-size image"
    assert isinstance(data.get("seed"), int) and data["seed"] >= 0, "seed -1 must come back as the seed used"


def test_img2img_with_init_image_and_init_images(target):
    still = make_init_image(160, 120)  # a camera still, 4:3
    body = load_payload("picker_generate_img2img")["body"]
    assert body["init_image"] == body["init_images"][0] == "<init_image>"
    img, data = _generate_image(target, inject_images(body, still))
    assert img.size == MODEL_SIZE


def test_img2img_init_image_is_used(target):
    """Two different stills with the same seed give different pictures (the init image is not ignored)."""
    body = dict(load_payload("picker_generate_img2img")["body"], seed=99)
    a, _ = _generate_image(target, inject_images(body, make_init_image(160, 120)))
    dark = Image.new("RGB", (160, 120), (10, 10, 10))
    b, _ = _generate_image(target, dict(body, init_image=png_b64(dark), init_images=[png_b64(dark)]))
    assert a.tobytes() != b.tobytes()


KNOBS = {  # knob title -> values, the shape of the picker's categories
    "Colour": ["red", "green", "blue", "yellow"],
    "Animal": ["cat", "dog"],
    "Place": ["forest", "ocean", "mountain", "house"],
}


def _interrogate_structured(target, b64):
    """interrogate_structured(): urllib, raw base64 PNG, the knobs as categories, 30 s timeout."""
    headers = {"Content-Type": "application/json"}
    if target.auth:
        headers["Authorization"] = target.basic_header()
    body = json.dumps({"image": b64, "categories": KNOBS}).encode()
    req = urllib.request.Request(target.url("/sdapi/v1/interrogate/structured"), data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        return json.loads(resp.read())


def test_structured_interrogation_of_a_still_and_of_the_generated_image(target):
    if not interrogation_available(target):
        pytest.skip("this deployment has no CLIP models (interrogation off)")
    still = Image.new("RGB", (160, 120), (210, 30, 35))
    answer = _interrogate_structured(target, png_b64(still))
    assert_structured_answer(answer, KNOBS)
    if target.demo:
        assert answer["results"]["Colour"]["winner"] == "red"
    body = inject_images(load_payload("picker_generate_img2img")["body"], still)
    _, data = _generate_image(target, body)
    assert_structured_answer(_interrogate_structured(target, data["base64"]), KNOBS)
