"""webuiapi 0.9.17 (PyPI), used the way its users use it."""

from __future__ import annotations

import json
import time

import pytest
import requests
import webuiapi
from PIL import Image

from compat_tests.helpers import (
    Background,
    assert_model_image,
    interrogation_available,
    is_busy,
    is_idle,
    poll_while,
    wait_until,
)

pytestmark = pytest.mark.client("webuiapi")

PROMPT = "a lighthouse on a cliff at sunset, oil painting"
INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "subseed", "all_subseeds",
             "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size", "index_of_first_image",
             "infotexts", "sd_model_name", "sd_model_hash", "job_timestamp"}


def _client(tgt) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(host=tgt.host, port=tgt.port, use_https=tgt.https)  # calls /scripts
    if tgt.auth:
        api.set_auth(*tgt.auth)
    return api


@pytest.fixture(scope="module")
def api(target):
    return _client(target)


def test_constructor_scripts_add_no_alwayson_entries(api):
    """/scripts answers {txt2img, img2img} lists, so webuiapi adds no ControlNet/ADetailer entries."""
    scripts = api.get_scripts()
    assert isinstance(scripts["txt2img"], list) and isinstance(scripts["img2img"], list)
    assert not (api.has_controlnet or api.has_adetailer or api.has_animatediff)


def test_txt2img_result_as_users_read_it(api, target):
    result = api.txt2img(prompt=PROMPT, seed=1234)
    assert_model_image(result.image)
    info = result.info
    assert isinstance(info, dict), f"info is not JSON: {info!r:.200}"
    assert info["all_seeds"] == [1234] and info["seed"] == 1234
    assert len(info["infotexts"]) == 1 and "Seed: 1234" in info["infotexts"][0]
    assert info["infotexts"][0].startswith(PROMPT)
    assert (info["width"], info["height"]) == result.image.size
    missing = INFO_KEYS - info.keys()
    assert not missing, f"info lacks {sorted(missing)}"
    # info reports what ran (webuiapi sent steps 20 and "Euler a"), not what was asked for: steps up to
    # the server's max_steps (4 with the four published time rows, MAX_STEPS with a time table)
    max_steps = requests.get(target.url("/capabilities"), auth=target.auth, timeout=30).json()["max_steps"]
    assert info["sampler_name"] == "LCM" and info["steps"] == min(20, max_steps)
    assert f"Steps: {info['steps']}" in info["infotexts"][0] and "Sampler: LCM" in info["infotexts"][0]
    assert isinstance(result.parameters, dict) and result.parameters["prompt"] == PROMPT
    assert result.image.info.get("parameters") == info["infotexts"][0], "PNG lacks the infotext chunk"


def test_txt2img_same_seed_same_image(api):
    a = api.txt2img(prompt=PROMPT, seed=777).image
    b = api.txt2img(prompt=PROMPT, seed=777).image
    c = api.txt2img(prompt=PROMPT, seed=778).image
    assert a.tobytes() == b.tobytes(), "the same seed gave a different image"
    assert a.tobytes() != c.tobytes(), "a different seed gave the same image"


def test_txt2img_batch_seeds(api):
    result = api.txt2img(prompt=PROMPT, seed=500, batch_size=2)
    assert len(result.images) == 2
    for img in result.images:
        assert_model_image(img)
    assert result.info["all_seeds"] == [500, 501]
    assert len(result.info["infotexts"]) == 2
    assert "Seed: 501" in result.info["infotexts"][1]


def test_img2img_with_pil_image(api, init_image):
    """img2img sends the PIL image as a data: URI."""
    result = api.img2img(images=[init_image], prompt="a watercolor harbour", denoising_strength=0.5, seed=7)
    assert_model_image(result.image)
    assert isinstance(result.info, dict) and result.info["all_seeds"] == [7]
    assert len(result.info["infotexts"]) == 1
    assert not result.parameters.get("init_images"), "parameters echo the init image back"
    assert result.parameters["denoising_strength"] == 0.5
    assert result.parameters["prompt"] == "a watercolor harbour"
    assert result.info["denoising_strength"] == 0.5
    assert result.image.info.get("parameters") == result.info["infotexts"][0]


def test_png_info_round_trip(api):
    result = api.txt2img(prompt=PROMPT, seed=4321)
    png = api.png_info(result.image)
    assert png.info == result.info["infotexts"][0]
    params = png.parameters
    assert isinstance(params, dict)
    assert str(params.get("Seed")) == "4321"
    assert params.get("Prompt") == PROMPT
    assert str(params.get("Size-1")) == str(result.image.width)


def test_options_get_and_set(api):
    options = api.get_options()
    models = api.get_sd_models()
    assert options["sd_model_checkpoint"] in [m["title"] for m in models]
    assert "forge_preset" not in options
    # set_options returns .json() of the answer: it must parse, and A1111 answers null
    assert api.set_options({"sd_model_checkpoint": options["sd_model_checkpoint"]}) is None
    assert api.get_options()["sd_model_checkpoint"] == options["sd_model_checkpoint"]


def test_util_model_names_set_and_current(api):
    names = api.util_get_model_names()
    assert names and names == sorted(names)
    api.util_set_model(names[0])
    assert api.util_get_current_model() == names[0]
    api.util_set_model(api.get_sd_models()[0]["model_name"])  # fuzzy match, lower-cased
    assert api.util_get_current_model() == names[0]


def test_util_current_model_fallback_via_checkpoint_hash(api, monkeypatch):
    """Without sd_model_checkpoint, util_get_current_model finds the sd-models entry whose sha256 is
    options['sd_checkpoint_hash']; that needs the real sha256 in both answers."""
    options = api.get_options()
    assert options.get("sd_checkpoint_hash"), "options lack sd_checkpoint_hash (webuiapi's fallback)"
    current = api.util_get_current_model()
    real_get_options = api.get_options

    def options_without_checkpoint():
        return {k: v for k, v in real_get_options().items() if k != "sd_model_checkpoint"}

    monkeypatch.setattr(api, "get_options", options_without_checkpoint)
    assert api.util_get_current_model() == current  # IndexError here if no sha256 matches


def test_util_wait_for_ready(api):
    waiter = Background(lambda: api.util_wait_for_ready(check_interval=0.2))
    waiter.get(timeout=30)


def test_util_wait_for_ready_waits_for_a_running_job(api, target, long_job):
    """"Ready" is A1111's "no job running" (/progress: progress 0 and job_count 0). Called while a
    generation runs, util_wait_for_ready keeps polling while the job runs and returns at the first idle
    answer: every answer it saw before the last was busy, the last idle (no clock involved)."""
    poller = _client(target)
    seen: list[dict] = []
    get_progress = poller.get_progress

    def recording_get_progress(*args, **kwargs):
        answer = get_progress(*args, **kwargs)
        seen.append(answer)
        return answer

    poller.get_progress = recording_get_progress
    gen = Background(lambda: api.txt2img(prompt=PROMPT, seed=31, **long_job))
    if not wait_until(lambda: is_busy(get_progress()), timeout=30, interval=0.005):
        pytest.skip("the generation ended before it was seen running")
    waiter = Background(lambda: poller.util_wait_for_ready(check_interval=0.05))
    waiter.get(timeout=120)
    if is_idle(seen[0]):
        pytest.skip("the generation ended before util_wait_for_ready first polled")
    assert is_idle(seen[-1]), "util_wait_for_ready returned on a busy answer"
    assert all(is_busy(answer) and not is_idle(answer) for answer in seen[:-1]), \
        "util_wait_for_ready kept waiting after an idle answer"
    result = gen.get()
    assert len(result.images) == long_job["batch_size"] * long_job["n_iter"]


def test_get_progress_from_second_thread(api, target, long_job):
    poller = _client(target)
    gen = Background(lambda: api.txt2img(prompt=PROMPT, seed=11, **long_job))
    seen = poll_while(gen, poller.get_progress, interval=0.01)
    result = gen.get()
    assert len(result.images) == long_job["batch_size"] * long_job["n_iter"]
    during = [p for running, p in seen if running]
    assert during, "no /progress answer came back while the generation ran"
    for p in during:
        assert 0.0 <= p["progress"] <= 1.0
        assert "current_image" in p and "eta_relative" in p
    busy = [p for p in during if is_busy(p)]
    assert busy, f"/progress looked idle during the whole generation: {during[-1]}"
    assert any(p["state"]["job"] for p in busy), "state.job empty while generating"
    assert is_idle(poller.get_progress())


def test_interrupt(api, target, long_job):
    poller = _client(target)
    gen = Background(lambda: api.txt2img(prompt=PROMPT, seed=21, **long_job))
    busy = None
    while gen.alive() and busy is None:
        p = poller.get_progress()
        busy = p if is_busy(p) else None
        time.sleep(0.005)
    if busy is None:
        pytest.skip("generation finished before it was seen running; nothing to interrupt")
    assert poller.interrupt() == {}
    result = gen.get()
    state = busy["state"]
    if state["job_no"] < state["job_count"] - 1:  # at least one more job was still to come
        assert len(result.images) < long_job["batch_size"] * long_job["n_iter"], \
            "interrupt did not stop the remaining images"
    after = api.txt2img(prompt=PROMPT, seed=22, batch_size=2)
    assert len(after.images) == 2, "the interrupt flag stuck to the next generation"


def test_interrogate_returns_a_caption(api, target):
    """webuiapi.interrogate(image, model="clip"): a data URI; `info` is the caption."""
    if not interrogation_available(target):
        pytest.skip("this deployment has no CLIP models (interrogation off)")
    result = api.interrogate(Image.new("RGB", (256, 256), (210, 30, 35)), model="clip")
    assert isinstance(result.info, str) and result.info
    if target.demo:
        assert result.info.split(", ")[0] == "red"


def test_list_endpoints(api):
    samplers = api.get_samplers()
    assert "LCM" in [s["name"] for s in samplers]
    assert api.util_get_sampler_names() and api.util_get_scheduler_names()
    for s in api.get_schedulers():
        assert {"name", "label"} <= s.keys()
    for m in api.get_sd_models():
        assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= m.keys()
    upscalers = api.get_upscalers()
    assert isinstance(upscalers, list) and all("name" in u for u in upscalers)
    assert isinstance(api.get_loras(), list)
    memory = api.get_memory()
    assert isinstance(memory, dict) and "ram" in memory


def test_auth(auth_target):
    anon = webuiapi.WebUIApi(host=auth_target.host, port=auth_target.port, use_https=auth_target.https)
    with pytest.raises(RuntimeError) as err:
        anon.txt2img(prompt=PROMPT, steps=1)
    assert err.value.args[0] == 401
    assert json.loads(err.value.args[1])["detail"] == "Not authenticated"
    anon.set_auth(auth_target.auth[0], auth_target.auth[1] + "-wrong")
    with pytest.raises(RuntimeError) as err:
        anon.txt2img(prompt=PROMPT, steps=1)
    assert err.value.args[0] == 401
    assert json.loads(err.value.args[1])["detail"] == "Incorrect username or password"
    anon.set_auth(*auth_target.auth)
    result = anon.txt2img(prompt=PROMPT, steps=1, seed=3)
    assert_model_image(result.image)
    assert result.info["all_seeds"] == [3]
