"""SillyTavern's Stable Diffusion extension, source "auto" (server side), replayed."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from compat_tests.helpers import MODEL_SIZE, Background, is_busy, is_idle, load_payload, wait_until

pytestmark = pytest.mark.client("SillyTavern")


def _h(target) -> dict[str, str]:
    """getBasicAuthHeader(auth): `Basic ` + base64(auth), sent even when auth is empty."""
    return {"Authorization": target.basic_header(), "Content-Type": "application/json"}


def _get(target, path):
    return requests.get(target.url(path), headers=_h(target), timeout=60)


def test_basic_header_with_empty_credentials_is_ignored(target):
    if target.auth is not None:
        pytest.skip("auth configured: SillyTavern sends real credentials")
    assert _h(target)["Authorization"] == "Basic "
    assert _get(target, "/sdapi/v1/options").ok


def test_ping(target):
    assert _get(target, "/sdapi/v1/options").ok


def test_samplers_schedulers_models_vaes(target):
    samplers = [x["name"] for x in _get(target, "/sdapi/v1/samplers").json()]
    schedulers = [x["name"] for x in _get(target, "/sdapi/v1/schedulers").json()]
    models = [{"value": x["title"], "text": x["title"]} for x in _get(target, "/sdapi/v1/sd-models").json()]
    vaes = _get(target, "/sdapi/v1/sd-vae").json()
    assert samplers and schedulers and models
    assert isinstance(vaes, list) and all("model_name" in x for x in vaes)


def test_upscalers_with_latent_modes(target):
    """Promise.all of upscalers and latent-upscale-modes; latent names spliced in after index 0 ("None")."""
    with ThreadPoolExecutor(2) as pool:
        up, latent = pool.map(lambda p: _get(target, p),
                              ["/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes"])
    assert up.ok and latent.ok, (up.status_code, latent.status_code)
    names = [x["name"] for x in up.json()]
    latent_names = [x["name"] for x in latent.json()]
    assert names and names[0] == "None", f"upscalers[0] must be 'None' (the UI's '0 = None'): {names}"
    offered = [names[0], *latent_names, *names[1:]]  # upscalers.splice(1, 0, ...latentUpscalers)
    assert all(isinstance(n, str) and n for n in offered), offered
    assert offered.count("None") == 1, f"'None' offered twice: {offered}"


def test_vaes_newer_all_settled(target):
    """Newer /vaes: Promise.allSettled of sd-vae and Forge's sd-modules; the first fulfilled array is used."""
    with ThreadPoolExecutor(2) as pool:
        vae, modules = pool.map(lambda p: _get(target, p), ["/sdapi/v1/sd-vae", "/sdapi/v1/sd-modules"])
    assert vae.ok, f"sd-vae -> {vae.status_code}"
    assert isinstance(vae.json(), list) and all("model_name" in x for x in vae.json())
    assert not modules.ok or isinstance(modules.json(), list)


def test_get_and_set_model_then_wait_idle(target):
    titles = [x["title"] for x in _get(target, "/sdapi/v1/sd-models").json()]
    current = _get(target, "/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert current in titles
    r = requests.post(target.url("/sdapi/v1/options"), json={"sd_model_checkpoint": titles[0]},
                      headers=_h(target), timeout=60)
    assert r.ok, f"set-model -> {r.status_code}: {r.text[:300]}"
    for _ in range(10):
        progress = _get(target, "/sdapi/v1/progress").json()
        if is_idle(progress):
            break
        time.sleep(2)
    else:
        pytest.fail(f"/progress never went idle after set-model: {progress}")


def test_generate(target):
    """Newer server: GET options (Forge detection), then the whole body incl. url/auth to txt2img."""
    options = _get(target, "/sdapi/v1/options").json()
    assert "forge_preset" not in options, "SillyTavern would treat the server as Forge"
    body = load_payload("sillytavern_txt2img")["body"]
    r = requests.post(target.url("/sdapi/v1/txt2img"), json=body, headers=_h(target), timeout=120)
    assert r.ok, f"txt2img -> {r.status_code}: {r.text[:300]}"
    data = r.json()
    img = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))  # saveBase64AsFile(..., 'png')
    assert img.format == "PNG" and img.size == MODEL_SIZE


def test_interrupt_when_browser_disconnects(target, long_job):
    """The browser socket closes mid-generation: the server POSTs /interrupt; the next job runs fully."""
    body = dict(load_payload("sillytavern_txt2img")["body"], save_images=False, **long_job)

    def abandoned():
        try:
            requests.post(target.url("/sdapi/v1/txt2img"), json=body, headers=_h(target), timeout=(5, 0.1))
        except requests.ReadTimeout:
            return "disconnected"
        return "finished"

    outcome = Background(abandoned).get(timeout=60)
    if outcome == "finished":
        pytest.skip("the generation finished before the client gave up")
    r = requests.post(target.url("/sdapi/v1/interrupt"), headers=_h(target), timeout=30)
    assert r.ok and r.json() == {}
    assert wait_until(lambda: not is_busy(_get(target, "/sdapi/v1/progress").json()), timeout=60), \
        "the server stayed busy after the interrupt"
    again = requests.post(target.url("/sdapi/v1/txt2img"), json=dict(body, batch_size=2, n_iter=1),
                          headers=_h(target), timeout=120)
    assert again.ok and len(again.json()["images"]) == 2, "the next generation was cut short"
