"""Open WebUI's AUTOMATIC1111 image engine, replayed (webui_api.md §3b)."""

from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image

from compat_tests.helpers import MODEL_SIZE, load_payload

pytestmark = pytest.mark.client("Open WebUI")


def _headers(target) -> dict[str, str]:
    """`authorization: ''` when auth is not configured, else `Basic <b64>`."""
    if target.auth is None:
        return {"authorization": ""}
    return {"authorization": target.basic_header()}


def _get(target, path):
    return requests.get(target.url(path), headers=_headers(target), timeout=60)


def test_connection_verify(target):
    """GET /config/url/verify -> GET /sdapi/v1/options, raise_for_status()."""
    r = _get(target, "/sdapi/v1/options")
    r.raise_for_status()


def test_model_listing(target):
    r = _get(target, "/sdapi/v1/sd-models")
    r.raise_for_status()
    models = [{"id": m["title"], "name": m["model_name"]} for m in r.json()]
    assert models and all(isinstance(m["id"], str) and m["id"] for m in models)


def test_set_model_posts_whole_options_dict(target):
    """set_image_model: GET /options, change sd_model_checkpoint, POST the entire dict back."""
    title = _get(target, "/sdapi/v1/sd-models").json()[0]["title"]
    options = _get(target, "/sdapi/v1/options").json()
    options["sd_model_checkpoint"] = title
    r = requests.post(target.url("/sdapi/v1/options"), json=options, headers=_headers(target), timeout=60)
    r.raise_for_status()
    after = _get(target, "/sdapi/v1/options").json()
    assert after["sd_model_checkpoint"] == title
    assert after.keys() == options.keys(), "posting the options back changed the set of keys"
    changed = {k for k in options if after[k] != options[k]}
    assert not changed, f"posting the options back changed {sorted(changed)}"


def test_generate(target):
    """Options before every generation, then txt2img; reads res['images'] and res['info']."""
    r = _get(target, "/sdapi/v1/options")
    assert r.json()["sd_model_checkpoint"]
    body = load_payload("openwebui_txt2img")["body"]
    res = requests.post(target.url("/sdapi/v1/txt2img"), json=body, headers=_headers(target),
                        timeout=120).json()  # parsed regardless of status, as Open WebUI does
    assert "info" in res, f"no 'info' in the answer: {str(res)[:300]}"
    assert len(res["images"]) == body["batch_size"]
    for image in res["images"]:
        if "," in image:  # get_image_data: a data: URI header is split off
            header, image = image.split(",", 1)
            assert "image/png" in header
        img = Image.open(io.BytesIO(base64.b64decode(image)))
        assert img.format == "PNG" and img.size == MODEL_SIZE
