"""The OpenAI images API (/v1/*) through the real `openai` SDK against a live demo-pack server."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import openai
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image

from pi_axera_sd_service.api.app import create_app
from pi_axera_sd_service.api.errors import describe, error_response
from pi_axera_sd_service.service.engine import Engine
from pi_axera_sd_service.service.errors import CapabilityError, QueueFullError, RequestError

PROMPT = "a lighthouse on a cliff, (oil painting:1.2)"


def sdk(server, api_key: str = "sk-anything") -> openai.OpenAI:
    """The SDK as a user points it at this service (no retries: a test sees the first answer)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def png_bytes(color: tuple[int, int, int], size=(96, 64)) -> bytes:
    img = Image.new("RGB", size, color)
    img.paste((255, 255, 255), (10, 10, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def server(live_server, settings_factory):
    return live_server(settings_factory())


# ---------------------------------------------------------------------------- generations
def test_generate_two_images_with_distinct_seeds(server):
    resp = sdk(server).images.generate(prompt=PROMPT, n=2, size="512x512", response_format="b64_json")
    images = [decode(item.b64_json) for item in resp.data]
    assert len(images) == 2 and all(img.size == (512, 512) and img.format == "PNG" for img in images)
    extra = resp.model_extra["pi_axera_sd"]
    assert len(set(extra["seeds"])) == 2 and extra["seeds"][1] == extra["seeds"][0] + 1
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert extra["model"] == "unet" and extra["warnings"] == []
    assert resp.created > 0 and resp.output_format == "png" and resp.size == "512x512"


def test_same_seed_gives_the_same_pixels_as_sdapi_txt2img(server):
    resp = sdk(server).images.generate(prompt=PROMPT, extra_body={"seed": 1234})
    sdapi = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 1234},
                          timeout=120)
    assert sdapi.status_code == 200
    ours = np.asarray(decode(resp.data[0].b64_json))
    theirs = np.asarray(decode(sdapi.json()["images"][0]))
    assert np.array_equal(ours, theirs)
    assert resp.model_extra["pi_axera_sd"]["seeds"] == [1234]


def test_sd_extras_reach_the_generation(server):
    resp = sdk(server).images.generate(
        prompt=PROMPT, extra_body={"negative_prompt": "blurry", "seed": 5, "steps": 2, "cfg_scale": 1.5})
    extra = resp.model_extra["pi_axera_sd"]
    assert "Negative prompt: blurry" in extra["infotexts"][0]
    assert "Steps: 2" in extra["infotexts"][0] and "CFG scale: 1.5" in extra["infotexts"][0]
    assert extra["seeds"] == [5] and extra["warnings"] == []
    plain = sdk(server).images.generate(prompt=PROMPT, extra_body={"seed": 5})
    assert plain.data[0].b64_json != resp.data[0].b64_json


def test_a1111_prompt_syntax_works_in_prompt(server):
    """A schedule between two equal texts is that text, and a LoRA tag is dropped with a warning:
    parsed as on /sdapi, not sent to the text encoder as typed."""
    client = sdk(server)
    tagged = client.images.generate(prompt="<lora:detail:0.8>a red fox [in the snow:in the snow:0.5]",
                                    extra_body={"seed": 8})
    plain = client.images.generate(prompt="a red fox in the snow", extra_body={"seed": 8})
    assert any("LoRA" in w for w in tagged.model_extra["pi_axera_sd"]["warnings"])
    pixels = [np.asarray(decode(resp.data[0].b64_json)) for resp in (tagged, plain)]
    assert np.array_equal(*pixels)


def test_openai_options_that_cannot_apply_are_warned_about(server):
    resp = sdk(server).images.generate(
        prompt=PROMPT, model="dall-e-3", size="1024x1024", quality="hd", style="vivid", user="u-1",
        extra_body={"seed": 9, "partial_images": 2})
    warnings = resp.model_extra["pi_axera_sd"]["warnings"]
    assert decode(resp.data[0].b64_json).size == (512, 512)
    for word in ("1024x1024", "quality 'hd'", "style 'vivid'", "'partial_images'"):
        assert any(word in w for w in warnings), f"no warning about {word}: {warnings}"
    assert not any("dall-e-3" in w or "u-1" in w for w in warnings), "model and user are accepted silently"
    assert resp.model_extra["pi_axera_sd"]["model"] == "unet", "the model that ran is reported"


def test_size_auto_is_the_models_size_without_warning(server):
    resp = sdk(server).images.generate(prompt=PROMPT, size="auto")
    assert resp.size == "512x512" and resp.model_extra["pi_axera_sd"]["warnings"] == []


def test_output_format_and_compression(server):
    client = sdk(server)
    small = client.images.generate(prompt=PROMPT, output_format="jpeg", output_compression=5,
                                   extra_body={"seed": 3})
    large = client.images.generate(prompt=PROMPT, output_format="jpeg", output_compression=95,
                                   extra_body={"seed": 3})
    assert decode(small.data[0].b64_json).format == "JPEG" and small.output_format == "jpeg"
    assert len(small.data[0].b64_json) < len(large.data[0].b64_json)
    webp = client.images.generate(prompt=PROMPT, output_format="webp")
    assert decode(webp.data[0].b64_json).format == "WEBP"


def test_n_is_capped_by_max_images_per_request(live_server, settings_factory):
    server = live_server(settings_factory(max_images_per_request=2))
    resp = sdk(server).images.generate(prompt=PROMPT, n=3)
    assert len(resp.data) == 2
    assert any("max_images_per_request 2" in w for w in resp.model_extra["pi_axera_sd"]["warnings"])


def test_strict_mode_rejects_a_clamp_naming_the_openai_field(live_server, settings_factory):
    server = live_server(settings_factory(strict=True))
    with pytest.raises(openai.BadRequestError) as info:
        sdk(server).images.generate(prompt=PROMPT, size="1024x1024")
    assert info.value.param == "size" and "strict mode" in info.value.message


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kwargs", "param", "words"), [
    ({"response_format": "url"}, "response_format", "keeps no image files"),
    ({"n": 0}, "n", "n must be at least 1"),
    ({"size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"output_format": "gif"}, "output_format", "png, jpeg or webp"),
    ({"extra_body": {"seed": "abc"}}, "seed", "seed"),
    ({"extra_body": {"steps": 2.5}}, "steps", "steps"),
    ({"n": 10**12}, "n", "less than or equal to 2147483647"),
    ({"extra_body": {"cfg_scale": 1e300}}, "cfg_scale", "less than or equal"),
    ({"extra_body": {"seed": 10**30}}, "seed", "out of range"),  # refused by the body check, same shape
    ({"extra_body": {"negative_prompt": "(" * 500 + "x"}}, "negative_prompt", "nested 500 deep"),
])
def test_bad_input_is_an_sdk_error_carrying_our_message(server, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        sdk(server).images.generate(prompt=PROMPT, **kwargs)
    err = info.value
    assert err.status_code == 400 and err.param == param and err.type == "invalid_request_error"
    assert words in err.message, err.message


def test_schema_errors_and_non_json_bodies_have_the_openai_shape(server):
    r = requests.post(server.url + "/v1/images/generations", json={"n": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "Field required" in r.json()["error"]["message"]
    r = requests.post(server.url + "/v1/images/generations", data=b"{not json", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in r.json()["error"]["message"]
    r = requests.post(server.url + "/v1/images/generations", json={"prompt": "x", "stream": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = requests.get(server.url + "/v1/images/generations", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"
    r = requests.post(server.url + "/v1/images/variations", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"


def test_not_ready_is_a_503_with_retry_after_in_openai_shape(settings_factory, demo_models):
    settings = settings_factory(queue_timeout=0.1)  # generation routes wait this long for a load
    client = TestClient(create_app(settings, Engine(settings, models=demo_models)))  # lifespan not run
    for method, path, kwargs in (("POST", "/v1/images/generations", {"json": {"prompt": "x"}}),
                                 ("GET", "/v1/models", {})):
        r = client.request(method, path, **kwargs)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.json()["error"]["type"] == "server_error" and "loading" in r.json()["error"]["message"]


def _openai_error(exc: Exception):
    """The response the app's one error map gives `exc` on a /v1 route."""
    err = describe(exc)
    assert err is not None
    return error_response("/v1/images/generations", err)


def test_queue_full_maps_to_503_with_retry_after():
    response = _openai_error(QueueFullError("The queue is full (max_queue=16)", retry_after=7))
    assert response.status_code == 503 and response.headers["Retry-After"] == "7"
    assert json.loads(response.body) == {"error": {"message": "The queue is full (max_queue=16)",
                                                   "type": "server_error", "param": None,
                                                   "code": "QueueFullError"}}
    not_found = _openai_error(RequestError("init_images", "Init image not found", status_code=404))
    assert not_found.status_code == 400 and json.loads(not_found.body)["error"]["code"] == "invalid_value"
    rejected = json.loads(_openai_error(CapabilityError("batch_size", "too many")).body)["error"]
    assert rejected["param"] == "n" and rejected["code"] == "unsupported_value"
    assert describe(ValueError("not ours")) is None


# ---------------------------------------------------------------------------- edits
def _edit(server, image: bytes, **kwargs):
    return sdk(server).images.edit(image=("input.png", image, "image/png"), prompt=PROMPT, **kwargs)


def test_edit_returns_an_image_that_depends_on_the_input(server):
    red, blue = png_bytes((200, 30, 30)), png_bytes((30, 30, 200))
    first = _edit(server, red, extra_body={"seed": 11, "strength": 0.5})
    again = _edit(server, red, extra_body={"seed": 11, "strength": 0.5})
    other = _edit(server, blue, extra_body={"seed": 11, "strength": 0.5})
    img = decode(first.data[0].b64_json)
    assert img.size == (512, 512)
    assert first.data[0].b64_json == again.data[0].b64_json
    assert not np.array_equal(np.asarray(img), np.asarray(decode(other.data[0].b64_json)))
    assert "Denoising strength: 0.5" in first.model_extra["pi_axera_sd"]["infotexts"][0]


def test_edit_default_strength_is_the_sdapi_img2img_default(server):
    resp = _edit(server, png_bytes((90, 160, 40)), n=2, size="512x512")
    assert len(resp.data) == 2
    assert all("Denoising strength: 0.75" in t for t in resp.model_extra["pi_axera_sd"]["infotexts"])


def test_edit_with_several_images(server):
    images = [("a.png", png_bytes((200, 30, 30)), "image/png"),
              ("b.png", png_bytes((30, 30, 200)), "image/png")]
    resp = sdk(server).images.edit(image=images, prompt=PROMPT, n=2, extra_body={"seed": 4})
    assert len(resp.data) == 2 and resp.model_extra["pi_axera_sd"]["warnings"] == []


def test_edit_mask_is_refused_never_ignored(server):
    image = png_bytes((200, 30, 30))
    with pytest.raises(openai.BadRequestError) as info:
        sdk(server).images.edit(image=("i.png", image, "image/png"), mask=("m.png", image, "image/png"),
                                prompt=PROMPT)
    assert info.value.param == "mask" and "inpainting" in info.value.message


def test_edit_undecodable_or_missing_image_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        _edit(server, b"not an image at all")
    assert info.value.param == "image" and "cannot decode image" in info.value.message
    r = requests.post(server.url + "/v1/images/edits", data={"prompt": "x"}, timeout=30,
                      files={"other": ("x.txt", b"x", "text/plain")})
    assert r.status_code == 400 and "image is required" in r.json()["error"]["message"]
    r = requests.post(server.url + "/v1/images/edits", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_edit_upload_goes_through_the_pixel_limit(live_server, settings_factory):
    server = live_server(settings_factory(max_init_image_pixels=1000))
    with pytest.raises(openai.BadRequestError) as info:
        _edit(server, png_bytes((1, 2, 3), size=(100, 100)))
    assert "max_init_image_pixels" in info.value.message


def test_edit_upload_goes_through_the_body_limit(live_server, settings_factory):
    server = live_server(settings_factory(max_body_bytes=20_000))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    with pytest.raises(openai.APIStatusError) as info:
        _edit(server, buf.getvalue())
    assert info.value.status_code == 413
    # refused by the body check before any route runs, yet in OpenAI's shape: the SDK reads our message
    assert "max_body_bytes=20000" in info.value.message
    assert info.value.body["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------- models
def test_models_list_shows_the_loaded_model(server):
    client = sdk(server)
    models = client.models.list()
    sd_models = requests.get(server.url + "/sdapi/v1/sd-models", timeout=30).json()
    assert [m.id for m in models.data] == [sd_models[0]["model_name"]]
    assert models.data[0].owned_by and models.data[0].created > 0
    assert client.models.retrieve(sd_models[0]["title"]).id == sd_models[0]["model_name"]
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("dall-e-3")
    assert "dall-e-3" in info.value.message


# ---------------------------------------------------------------------------- auth
def test_bearer_keys_on(live_server, settings_factory):
    server = live_server(settings_factory(api_keys="k-one, k-two"))
    assert len(sdk(server, "k-two").images.generate(prompt=PROMPT).data) == 1
    assert sdk(server, "k-one").models.list().data
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(server, "k-three").models.list()
    assert "Incorrect API key" in info.value.message and info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "k-on").images.generate(prompt=PROMPT)
    # every route takes the key; without one the A1111 routes answer their own 401; probes stay open
    ok = requests.get(server.url + "/sdapi/v1/options", headers={"Authorization": "Bearer k-one"}, timeout=30)
    assert ok.status_code == 200
    refused = requests.get(server.url + "/sdapi/v1/options", timeout=30)
    assert refused.status_code == 401 and refused.json()["detail"] == "Not authenticated"
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(server.url + "/health", timeout=30).status_code == 200


def test_bearer_keys_next_to_basic(live_server, settings_factory):
    server = live_server(settings_factory(api_auth="alice:s3cret", api_keys="k-one"))
    assert sdk(server, "k-one").models.list().data
    basic = requests.get(server.url + "/v1/models", auth=("alice", "s3cret"), timeout=30)
    assert basic.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "s3cret").models.list()
    wrong = requests.get(server.url + "/v1/models", auth=("alice", "nope"), timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "Incorrect username or password"


def test_basic_only_does_not_take_bearer(live_server, settings_factory):
    server = live_server(settings_factory(api_auth="alice:s3cret"))
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "s3cret").models.list()


def test_without_auth_any_authorization_header_is_ignored(server):
    assert sdk(server, "sk-dummy").models.list().data
    for header in ("Bearer ", "Basic ", ""):  # Open WebUI sends `Bearer ` when its key is empty
        r = requests.get(server.url + "/v1/models", headers={"Authorization": header}, timeout=30)
        assert r.status_code == 200, header
