"""AIYA Discord bot (Kilvoctu/aiyabot), replayed."""

from __future__ import annotations

import base64
import contextlib
import io
import json

import pytest
import requests
from PIL import Image

from compat_tests.helpers import (
    MODEL_SIZE,
    Background,
    inject_images,
    load_payload,
    poll_while,
    wait_until,
)

pytestmark = pytest.mark.client("AIYA bot")


@pytest.fixture(scope="module")
def session(target):
    """AIYA's requests.Session, with Basic auth when cmd-flags said 401."""
    s = requests.Session()
    if target.auth:
        s.auth = target.auth
    return s


def test_startup_probe(target, session):
    r = session.get(target.url("/sdapi/v1/cmd-flags"), timeout=60)
    assert r.status_code == 200, f"cmd-flags -> {r.status_code}: AIYA prints 'API is unreachable'"
    assert isinstance(r.json(), dict)
    assert requests.head(target.base_url, timeout=30).status_code < 500
    with contextlib.suppress(Exception):  # /sdapi/v1/version detects SD.Next; exceptions are ignored
        session.get(target.url("/sdapi/v1/version"), timeout=60).json()
    config = session.get(target.url("/config"), timeout=60)
    with contextlib.suppress(KeyError):  # caught by AIYA; a non-JSON body would not be
        config.json()["components"]
    login = session.post(target.url("/login"), timeout=60)  # authenticate_user(); the result is ignored
    assert login.status_code < 500, f"POST /login -> {login.status_code}"


def test_version_and_config_are_json_404(target, session):
    """Not A1111 API routes here: FastAPI's JSON 404, which AIYA parses."""
    for path in ("/sdapi/v1/version", "/config"):
        r = session.get(target.url(path), timeout=60)
        assert r.status_code == 404, f"{path} -> {r.status_code}"
        assert r.json() == {"detail": "Not Found"}


def test_startup_detects_api_auth(auth_target):
    """cmd-flags without credentials answers 401, which is how AIYA learns api-auth is on."""
    assert requests.get(auth_target.url("/sdapi/v1/cmd-flags"), timeout=60).status_code == 401
    assert requests.get(auth_target.url("/sdapi/v1/cmd-flags"), auth=auth_target.auth, timeout=60).ok


def test_startup_lists(target, session):
    """Each list fetched and iterated as settings.py does."""

    def get(path):
        r = session.get(target.url(path), timeout=60)
        assert r.status_code == 200, f"{path} -> {r.status_code}"
        return r.json()

    assert [s["name"] for s in get("/sdapi/v1/samplers")]
    for style in get("/sdapi/v1/prompt-styles"):
        style["name"], style["prompt"], style["negative_prompt"]
    for face in get("/sdapi/v1/face-restorers"):
        face["name"]
    embeddings = get("/sdapi/v1/embeddings")
    for section in ("loaded", "skipped"):
        for _name, emb in embeddings[section].items():
            emb["shape"]
    hypernetworks = get("/sdapi/v1/hypernetworks")
    assert isinstance(hypernetworks, (list, dict))
    for h in hypernetworks:
        (h["name"] if isinstance(h, dict) else hypernetworks[h]["name"])
    for up in get("/sdapi/v1/upscalers"):
        up["name"]
    models = get("/sdapi/v1/sd-models")
    assert models
    for m in models:
        m["title"], m["filename"], m.get("name") or m["model_name"], m["hash"]
    try:
        for lora in get("/sdapi/v1/loras"):
            lora["alias"]
    except (KeyError, TypeError, AssertionError):
        pass  # in try/except in AIYA


def _dream(target, session, body):
    route = "/sdapi/v1/img2img" if "init_images" in body else "/sdapi/v1/txt2img"
    r = session.post(target.url(route), json=body, timeout=120)
    assert r.status_code == 200, f"{route} -> {r.status_code}: {r.text[:300]}"
    return r.json()


def _check_images_with_png_info(target, session, data):
    """Every returned image is decoded and sent to png-info; the info goes into the saved PNG."""
    infotexts = json.loads(data["info"])["infotexts"]
    assert data["images"]
    for i, b64 in enumerate(data["images"]):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.size == MODEL_SIZE
        r = session.post(target.url("/sdapi/v1/png-info"), json={"image": "data:image/png;base64," + b64},
                         timeout=60)
        assert r.status_code == 200, f"png-info -> {r.status_code}"
        info = r.json()["info"]
        assert info and info == infotexts[i]


def test_generate_txt2img_with_png_info(target, session, model_title):
    r = session.post(target.url("/sdapi/v1/options"), json={"sd_model_checkpoint": model_title}, timeout=60)
    assert r.ok
    body = dict(load_payload("aiya_txt2img")["body"], n_iter=2)
    _check_images_with_png_info(target, session, _dream(target, session, body))


def test_generate_img2img_with_png_info(target, session, init_image):
    body = inject_images(load_payload("aiya_img2img")["body"], init_image)
    _check_images_with_png_info(target, session, _dream(target, session, body))


def test_progress_polling(target, session, long_job):
    """update_progress: state.job non-empty while running, '' twice in a row = done; it reads
    state.sampling_step, current_image (the key must exist), eta_relative (divided by when != 0), progress."""
    body = dict(load_payload("aiya_txt2img")["body"], **long_job)
    poller = requests.Session()
    poller.auth = session.auth

    def poll():
        r = poller.get(target.url("/sdapi/v1/progress"), timeout=30)
        assert r.status_code == 200
        p = r.json()
        assert "current_image" in p, "AIYA indexes progress['current_image']"
        if p["current_image"]:  # base64 or null
            Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).load()
        eta = p["eta_relative"]
        assert isinstance(eta, (int, float)) and eta >= 0, f"eta_relative {eta!r}"
        if eta != 0:
            float(p["progress"]) / eta  # AIYA divides by it
        assert 0 <= float(p["progress"]) * 100 <= 100
        assert isinstance(p["state"]["sampling_step"], int)
        assert isinstance(p["state"]["job"], str)
        return p

    gen = Background(lambda: _dream(target, session, body))
    seen = poll_while(gen, poll, interval=0.01)
    assert len(gen.get()["images"]) == long_job["batch_size"] * long_job["n_iter"]
    running = [p for alive, p in seen if alive]
    assert running, "no /progress answer while the generation ran"
    jobs = [p["state"]["job"] for p in running]
    assert any(jobs), "state.job stayed '' while generating"
    first = next(i for i, j in enumerate(jobs) if j)
    last = max(i for i, j in enumerate(jobs) if j)
    # AIYA stops previewing at the first '' twice in a row: never between the first and last busy answer
    gaps = [i for i in range(first, last) if jobs[i] == "" and jobs[i + 1] == ""]
    assert not gaps, f"state.job '' twice in a row mid-job (AIYA would stop early): {jobs}"
    assert poll()["state"]["job"] == "" and poll()["state"]["job"] == "", \
        "state.job did not return to '' (twice in a row) after the answer came back"


def test_buttons_interrupt_and_skip_while_idle(target, session):
    """viewhandler.py buttons pressed when nothing runs must not cut the next generation short."""
    r = session.post(target.url("/sdapi/v1/interrupt"), timeout=30)
    assert r.status_code == 200 and r.json() == {}
    r = session.post(target.url("/sdapi/v1/skip"), timeout=30)
    assert r.status_code == 200
    r.json()  # JSON (A1111: null)
    body = dict(load_payload("aiya_txt2img")["body"], batch_size=2, n_iter=1)
    assert len(_dream(target, session, body)["images"]) == 2


def test_skip_button_during_generation(target, session, long_job):
    """Skip mid-job: the bot's request still gets a 200 with decodable images."""
    body = dict(load_payload("aiya_txt2img")["body"], **long_job)
    gen = Background(lambda: _dream(target, session, body))
    poller = requests.Session()
    poller.auth = session.auth

    def running() -> bool:
        return poller.get(target.url("/sdapi/v1/progress"), timeout=30).json()["state"]["job"] != ""

    if not wait_until(running, timeout=30, interval=0.005):
        pytest.skip("the generation ended before it was seen running")
    assert poller.post(target.url("/sdapi/v1/skip"), timeout=30).status_code == 200
    data = gen.get()
    assert 1 <= len(data["images"]) <= long_job["batch_size"] * long_job["n_iter"]
    for b64 in data["images"]:
        assert Image.open(io.BytesIO(base64.b64decode(b64))).size == MODEL_SIZE
