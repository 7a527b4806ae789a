"""stable-gimpfusion GIMP plugin, replayed with urllib as the plugin does."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from compat_tests.helpers import MODEL_SIZE, inject_images, load_payload

pytestmark = pytest.mark.client("GIMP stable-gimpfusion")


def _call(target, endpoint, body=None, params=None):
    """base + endpoint + "?" + urlencode(params): the URL always ends with '?' when params is empty."""
    url = target.base_url + endpoint + "?" + urllib.parse.urlencode(params or {})
    assert url.endswith("?")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if target.auth:
        headers["Authorization"] = target.basic_header()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _layers(response):
    """ResponseLayers: info.infotexts and info.all_seeds drive layer creation from raw base64 images."""
    info = json.loads(response["info"])
    infotexts, seeds = info["infotexts"], info["all_seeds"]
    layers = []
    for i, b64 in enumerate(response["images"]):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        if i < len(seeds):
            layers.append(("image", seeds[i], infotexts[i], img))
        else:
            layers.append(("annotator", None, "", img))
    return layers


def test_settings_load(target):
    """options -> sd_model_checkpoint, sd-models -> title, controlnet/model_list (a failure gives {})."""
    options = _call(target, "/sdapi/v1/options")
    titles = [m["title"] for m in _call(target, "/sdapi/v1/sd-models")]
    assert options["sd_model_checkpoint"] in titles
    try:
        controlnet = _call(target, "/controlnet/model_list")
    except urllib.error.HTTPError as err:  # the plugin's request helper returns None -> {}
        assert err.code == 404, f"/controlnet/model_list? -> {err.code}"
        controlnet = None
    assert (controlnet or {}).get("model_list", []) == []


def test_txt2img_layers(target):
    body = load_payload("gimp_txt2img")["body"]
    layers = _layers(_call(target, "/sdapi/v1/txt2img", body))
    kinds = [k for k, *_ in layers]
    assert kinds == ["image"] * body["batch_size"], "extra images would become annotator layers"
    seeds = [s for _, s, _, _ in layers]
    assert seeds[0] >= 0 and seeds[1] == seeds[0] + 1, f"all_seeds {seeds}: seed -1 must be resolved"
    for _, seed, infotext, img in layers:
        assert img.size == MODEL_SIZE
        assert f"Seed: {seed}" in infotext


def test_img2img_raw_base64(target, init_image):
    body = inject_images(load_payload("gimp_img2img")["body"], init_image)
    assert not body["init_images"][0].startswith("data:")
    layers = _layers(_call(target, "/sdapi/v1/img2img", body))
    assert [k for k, *_ in layers] == ["image"] * body["batch_size"], "extra images become annotator layers"
    _, seed, infotext, img = layers[0]
    assert img.size == MODEL_SIZE and seed >= 0 and f"Seed: {seed}" in infotext
    assert "Denoising strength: 0.6" in infotext


def test_img2img_batch_cycles_one_init_image(target, init_image):
    """batch_size 2 with one init image: two image layers, seeds seed and seed+1, no annotator layers."""
    body = dict(inject_images(load_payload("gimp_img2img")["body"], init_image), batch_size=2, seed=1000)
    layers = _layers(_call(target, "/sdapi/v1/img2img", body))
    assert [(k, s) for k, s, *_ in layers] == [("image", 1000), ("image", 1001)]


def test_model_change(target, model_title):
    _call(target, "/sdapi/v1/options", {"sd_model_checkpoint": model_title})  # a JSON body
    assert _call(target, "/sdapi/v1/options")["sd_model_checkpoint"] == model_title
