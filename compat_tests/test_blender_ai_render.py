"""Blender AI-Render (benrugg/AI-Render automatic1111_api.py), replayed."""

from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image

from compat_tests.helpers import MODEL_SIZE, inject_images, load_payload

pytestmark = pytest.mark.client("Blender AI-Render")

HEADERS = {"User-Agent": "Blender/4.2.0", "Accept": "*/*", "Accept-Encoding": "gzip, deflate, br"}
JSON_HEADERS = {"Accept": "application/json"}


def test_img2img_sampler_index_data_uri(target, init_image):
    """The render is saved as an RGBA PNG and sent as a data: URI; images[0] is decoded."""
    body = inject_images(load_payload("blender_ai_render_img2img")["body"], init_image.convert("RGBA"))
    assert body["denoising_strength"] == round(1 - body["image_similarity"], 2)  # map_params
    assert body["init_images"][0].startswith("data:image/png;base64,") and "sampler_name" not in body
    r = requests.post(target.url("/sdapi/v1/img2img"), json=body, headers=HEADERS, auth=target.auth,
                      timeout=120)
    assert r.status_code == 200, f"img2img -> {r.status_code}: {r.text[:300]}"
    assert r.headers.get("Content-Encoding", "identity") in ("identity", "gzip", "deflate", "br")
    image = r.json()["images"][0].replace("data:image/png;base64,", "")
    img = Image.open(io.BytesIO(base64.b64decode(image)))
    assert img.size == MODEL_SIZE


def test_wrong_route_is_json_404_not_found(target):
    """AI-Render tells 'not in API mode' from a 404 whose detail is exactly 'Not Found'."""
    r = requests.post(target.url("/sdapi/v1/img2img-typo"), json={}, headers=HEADERS, auth=target.auth,
                      timeout=30)
    assert r.status_code == 404
    assert r.json().get("detail") == "Not Found"
    r = requests.get(target.url("/controlnet/model_list"), headers=JSON_HEADERS, auth=target.auth, timeout=5)
    assert r.status_code == 404 and r.json().get("detail") == "Not Found"


def test_upscalers(target):
    r = requests.get(target.url("/sdapi/v1/upscalers"), headers=JSON_HEADERS, auth=target.auth, timeout=5)
    assert r.status_code == 200
    models = r.json()
    assert models, "AI-Render reports 'No upscaler models are installed' for an empty list"
    [u["name"] for u in models if u["name"] != "None"]
