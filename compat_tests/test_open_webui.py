"""Open WebUI's AUTOMATIC1111 image engine, replayed."""

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


def test_empty_authorization_header_is_sent(target):
    """requests keeps the empty value: the request really carries `authorization: ` (no credentials)."""
    if target.auth is not None:
        pytest.skip("auth configured: Open WebUI sends Basic credentials")
    prepared = requests.Request("GET", target.url("/sdapi/v1/options"), headers=_headers(target)).prepare()
    assert prepared.headers["authorization"] == ""
    r = requests.Session().send(prepared, timeout=60)
    assert r.status_code == 200, f"an empty authorization header -> {r.status_code}: {r.text[:200]}"


def test_empty_basic_credentials_setting(target):
    """AUTOMATIC1111_API_AUTH = '' gives `Basic ` and nothing more; without --api-auth it is ignored."""
    if target.auth is not None:
        pytest.skip("auth configured: Open WebUI sends real credentials")
    r = requests.get(target.url("/sdapi/v1/options"), headers={"authorization": "Basic "}, timeout=60)
    assert r.status_code == 200, f"authorization 'Basic ' -> {r.status_code}: {r.text[:200]}"


def get_image_data(data: str) -> tuple[bytes, str]:
    """Open WebUI get_image_data for a non-URL string: split a data: header off when there is a ','."""
    if "," in data:
        header, encoded = data.split(",", 1)
        mime_type = header.split(";")[0].removeprefix("data:")
        return base64.b64decode(encoded), mime_type
    return base64.b64decode(data), "image/png"


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


def _generate(target, body):
    """get_image_model (GET options) before every generation, then txt2img; reads images and info."""
    r = _get(target, "/sdapi/v1/options")
    r.raise_for_status()  # any exception -> HTTP 400 "Failed to connect to the image generation engine"
    titles = [m["title"] for m in _get(target, "/sdapi/v1/sd-models").json()]
    assert r.json()["sd_model_checkpoint"] in titles
    res = requests.post(target.url("/sdapi/v1/txt2img"), json=body, headers=_headers(target),
                        timeout=120).json()  # parsed regardless of status, as Open WebUI does
    assert "info" in res, f"no 'info' in the answer (KeyError -> 400): {str(res)[:300]}"
    assert isinstance(res["info"], str), "info goes into file metadata as the string A1111 returns"
    images = []
    for image in res["images"]:
        data, mime = get_image_data(image)
        assert mime == "image/png"
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == MODEL_SIZE
        images.append(img)
    return res, images


def test_get_image_data_both_forms(target):
    """get_image_data takes the mime type from a data: header when there is a ','; our images have none."""
    res, images = _generate(target, dict(load_payload("openwebui_txt2img")["body"], batch_size=1))
    raw = res["images"][0]
    assert "," not in raw, "a raw base64 image (Open WebUI assumes image/png)"
    data, mime = get_image_data("data:image/png;base64," + raw)
    assert mime == "image/png" and data == base64.b64decode(raw)


def test_generate(target):
    """Current version: {prompt, batch_size: n, width, height, steps: IMAGE_STEPS 50, negative_prompt}."""
    body = load_payload("openwebui_txt2img")["body"]
    assert set(body) == {"prompt", "batch_size", "width", "height", "steps", "negative_prompt"}
    res, images = _generate(target, body)
    assert len(images) == body["batch_size"]


def test_generate_older_variant_with_cfg_sampler_scheduler(target):
    """@a828974 adds AUTOMATIC1111_CFG_SCALE / _SAMPLER / _SCHEDULER; an error body would be read as
    data['error']['message'], so a 200 is required."""
    body = dict(load_payload("openwebui_txt2img")["body"], batch_size=1, cfg_scale=7.0,
                sampler_name="Euler a", scheduler="Karras")
    r = requests.post(target.url("/sdapi/v1/txt2img"), json=body, headers=_headers(target), timeout=120)
    assert r.status_code == 200, f"txt2img -> {r.status_code}: {r.text[:300]}"
    data, mime = get_image_data(r.json()["images"][0])
    assert Image.open(io.BytesIO(data)).size == MODEL_SIZE


def test_full_sequence(target):
    """verify (options) -> models -> set_image_model (whole dict back, only when it differs) -> generate."""
    _get(target, "/sdapi/v1/options").raise_for_status()
    models = [{"id": m["title"], "name": m["model_name"]} for m in _get(target, "/sdapi/v1/sd-models").json()]
    options = _get(target, "/sdapi/v1/options").json()
    model = models[0]["id"]
    if model != options["sd_model_checkpoint"]:
        options["sd_model_checkpoint"] = model
        requests.post(target.url("/sdapi/v1/options"), json=options, headers=_headers(target),
                      timeout=60).raise_for_status()
    _, images = _generate(target, dict(load_payload("openwebui_txt2img")["body"], batch_size=1))
    assert len(images) == 1
