"""/sdapi/v1 on the demo pack: generation, A1111 error shapes, and discovery as the clients read it."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

INFO_KEYS = {
    "prompt",
    "all_prompts",
    "negative_prompt",
    "all_negative_prompts",
    "seed",
    "all_seeds",
    "subseed",
    "all_subseeds",
    "subseed_strength",
    "width",
    "height",
    "sampler_name",
    "cfg_scale",
    "steps",
    "batch_size",
    "restore_faces",
    "sd_model_name",
    "sd_model_hash",
    "denoising_strength",
    "extra_generation_params",
    "index_of_first_image",
    "infotexts",
    "styles",
    "job_timestamp",
    "clip_skip",
    "version",
    "warnings",
}
A1111_ERROR_KEYS = {"error", "detail", "body", "errors"}


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB"))


def png_b64(colour: str = "purple") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (200, 300), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_txt2img_images_info_and_parameters(app_client) -> None:
    resp = app_client.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a red barn",
            "seed": 77,
            "batch_size": 2,
            "n_iter": 2,
            "url": "http://x",
            "auth": "",
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    info = json.loads(body["info"])
    assert set(info) >= INFO_KEYS
    assert info["all_seeds"] == [77, 78, 79, 80] and info["seed"] == 77 and len(info["infotexts"]) == 4
    assert (info["width"], info["height"], info["sampler_name"], info["steps"]) == (512, 512, "LCM", 4)
    assert info["warnings"] == []
    assert len(body["images"]) == 4 and body["parameters"]["seed"] == 77
    assert body["parameters"]["steps"] == 50 and body["parameters"]["sampler_index"] == "Euler"
    for b64, text in zip(body["images"], info["infotexts"], strict=True):
        img = decode(b64)
        assert img.format == "PNG" and img.size == (512, 512) and img.info["parameters"] == text
    single = app_client.post("/sdapi/v1/txt2img", json={"prompt": "a red barn", "seed": 79}).json()
    assert np.array_equal(pixels(single["images"][0]), pixels(body["images"][2]))
    assert not np.array_equal(pixels(body["images"][0]), pixels(body["images"][1]))


def test_txt2img_echoes_seed_as_sent_and_reports_what_ran(app_client) -> None:
    body = app_client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "p", "steps": 20, "cfg_scale": 7, "width": 768, "sampler_name": "Euler a"},
    ).json()
    info = json.loads(body["info"])
    assert body["parameters"]["seed"] == -1 and 0 <= info["seed"] < 2**32
    assert (info["steps"], info["cfg_scale"], info["width"]) == (8, 2.0, 512)   # MAX_STEPS: a time table
    assert len(info["warnings"]) == 4
    assert body["parameters"]["steps"] == 20


def test_parameters_echo_the_request_with_a1111_defaults_while_info_reports_what_ran(app_client) -> None:
    """A1111 answers `vars(request)`: sent values as sent, its own defaults for omitted fields."""
    body = app_client.post("/sdapi/v1/txt2img", json={"prompt": "p", "seed": 5, "steps": 3}).json()
    params, info = body["parameters"], json.loads(body["info"])
    assert (params["prompt"], params["seed"], params["steps"]) == ("p", 5, 3)   # as sent
    assert (params["cfg_scale"], params["sampler_name"], params["sampler_index"]) == (7.0, None, "Euler")
    assert (params["width"], params["batch_size"], params["denoising_strength"]) == (512, 1, None)
    assert (info["steps"], info["cfg_scale"], info["sampler_name"]) == (3, 1.0, "LCM")   # what ran
    omitted = json.loads(app_client.post("/sdapi/v1/txt2img", json={"prompt": "p"}).json()["info"])
    assert (omitted["steps"], omitted["cfg_scale"]) == (4, 1.0) and omitted["warnings"] == []


def test_img2img_parameters_keep_include_init_images_as_a1111(app_client) -> None:
    sent = {"prompt": "p", "init_images": [png_b64()], "seed": 3}
    params = app_client.post("/sdapi/v1/img2img", json=sent).json()["parameters"]
    assert params["include_init_images"] is False and params["init_images"] is None and params["mask"] is None
    assert params["denoising_strength"] == 0.75 and params["resize_mode"] == 0   # A1111's img2img defaults
    kept = app_client.post(
        "/sdapi/v1/img2img", json={**sent, "include_init_images": True}
    ).json()["parameters"]
    assert kept["include_init_images"] is True and kept["init_images"] == sent["init_images"]


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"])
def test_img2img_raw_and_data_uri(app_client, prefix: str) -> None:
    init = prefix + png_b64()
    body_sent = {"prompt": "p", "init_images": [init], "seed": 3, "denoising_strength": 0.5}
    resp = app_client.post("/sdapi/v1/img2img", json={**body_sent, "sampler_index": "LCM"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    info = json.loads(body["info"])
    assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
    assert decode(body["images"][0]).size == (512, 512)
    assert body["parameters"]["init_images"] is None
    again = app_client.post("/sdapi/v1/img2img", json={**body_sent, "include_init_images": True})
    assert np.array_equal(pixels(again.json()["images"][0]), pixels(body["images"][0]))
    assert again.json()["parameters"]["init_images"] == [init]


def test_png_info_round_trip_of_a_generated_image(app_client) -> None:
    body = app_client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a cat, (sitting:1.2)", "seed": 5, "negative_prompt": "dog", "cfg_scale": 1.5},
    ).json()
    for image in (body["images"][0], "data:image/png;base64," + body["images"][0]):
        info = app_client.post("/sdapi/v1/png-info", json={"image": image}).json()
        assert info["info"] == json.loads(body["info"])["infotexts"][0]
        params = info["parameters"]
        assert params["Prompt"] == "a cat, (sitting:1.2)" and params["Negative prompt"] == "dog"
        assert (params["Seed"], params["Size-1"], params["Size-2"], params["Sampler"]) == (
            "5",
            "512",
            "512",
            "LCM",
        )


def test_jpeg_via_override_settings_carries_the_infotext(app_client) -> None:
    body = app_client.post(
        "/sdapi/v1/txt2img", json={"prompt": "p", "seed": 1, "override_settings": {"samples_format": "jpeg"}}
    ).json()
    assert decode(body["images"][0]).format == "JPEG"
    info = app_client.post("/sdapi/v1/png-info", json={"image": body["images"][0]}).json()
    assert info["parameters"]["Seed"] == "1"
    assert app_client.get("/sdapi/v1/options").json()["samples_format"] == "png"


def test_send_images_false_and_save_images(app_client) -> None:
    body = app_client.post(
        "/sdapi/v1/txt2img", json={"prompt": "p", "send_images": False, "save_images": True}
    )
    assert body.status_code == 200 and body.json()["images"] == []
    out = app_client.app.state.engine.settings.output_dir
    saved = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert len(saved) == 1 and decode(base64.b64encode(saved[0].read_bytes()).decode()).size == (512, 512)


@pytest.mark.parametrize(
    ("path", "payload", "status", "needle"),
    [
        ("/sdapi/v1/img2img", {"prompt": "p"}, 404, "Init image not found"),
        (
            "/sdapi/v1/img2img",
            {"prompt": "p", "init_images": ["bm90IGFuIGltYWdl"]},
            400,
            "Invalid encoded image",
        ),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "p", "script_name": "x/y/z plot"},
            422,
            "Script 'x/y/z plot' not found",
        ),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "p", "alwayson_scripts": {"controlnet": {"args": []}}},
            422,
            "controlnet",
        ),
        (
            "/sdapi/v1/img2img",
            {"prompt": "p", "init_images": [png_b64()], "mask": png_b64()},
            422,
            "inpainting",
        ),
        ("/sdapi/v1/txt2img", {"prompt": "p", "seed": "lucky"}, 422, "seed"),
        (
            "/sdapi/v1/img2img",
            {"prompt": "p", "init_images": [png_b64()], "resize_mode": 4},
            422,
            "resize_mode",
        ),
    ],
)
def test_a1111_error_shapes(app_client, path: str, payload: dict, status: int, needle: str) -> None:
    resp = app_client.post(path, json=payload)
    assert resp.status_code == status
    body = resp.json()
    assert set(body) == A1111_ERROR_KEYS and needle in body["detail"]


def test_schema_violations_keep_fastapi_422_and_unknown_routes_404(app_client) -> None:
    resp = app_client.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": "many"})
    assert resp.status_code == 422 and isinstance(resp.json()["detail"], list)
    assert resp.json()["detail"][0]["loc"][-1] == "steps"
    missing = app_client.get("/sdapi/v1/version")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}


def test_nulls_are_accepted(app_client) -> None:
    payload = {
        "prompt": "p",
        "seed": None,
        "denoising_strength": None,
        "steps": None,
        "cfg_scale": None,
        "styles": None,
        "override_settings": None,
        "sampler_name": None,
        "width": None,
    }
    resp = app_client.post("/sdapi/v1/txt2img", json=payload)
    assert resp.status_code == 200 and json.loads(resp.json()["info"])["warnings"] == []


def test_strict_policy_rejects_clamps_with_422(make_client, settings_factory) -> None:
    client = make_client(settings_factory(strict=True))
    resp = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "cfg_scale": 7})
    assert resp.status_code == 422 and "cfg_scale" in resp.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "p", "scheduler": "karras"}).status_code == 200


# ---------------------------------------------------------------- discovery and control
def test_options_models_and_lists_as_clients_read_them(app_client) -> None:
    options = app_client.get("/sdapi/v1/options").json()
    models = app_client.get("/sdapi/v1/sd-models").json()
    assert len(models) == 1 and set(models[0]) == {
        "title",
        "model_name",
        "hash",
        "sha256",
        "filename",
        "config",
    }
    model = models[0]
    assert (
        options["sd_model_checkpoint"]
        == model["title"]
        == f"{Path(model['filename']).name} [{model['hash']}]"
    )
    assert options["sd_checkpoint_hash"] == model["sha256"] and model["hash"] == model["sha256"][:10]
    assert "forge_preset" not in options and options["sd_vae"] == "Automatic"
    assert options["CLIP_stop_at_last_layers"] == 1 and options["samples_format"] == "png"
    assert app_client.get("/sdapi/v1/samplers").json() == [
        {"name": "LCM", "aliases": ["k_lcm", "lcm"], "options": {}}
    ]
    assert [s["name"] for s in app_client.get("/sdapi/v1/schedulers").json()] == ["automatic"]
    assert app_client.get("/sdapi/v1/upscalers").json()[0]["name"] == "None"
    for path in (
        "latent-upscale-modes",
        "sd-vae",
        "loras",
        "hypernetworks",
        "face-restorers",
        "realesrgan-models",
        "prompt-styles",
        "script-info",
        "extensions",
    ):
        assert app_client.get(f"/sdapi/v1/{path}").json() == [], path
    assert app_client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert app_client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    for path in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings"):
        assert app_client.post(f"/sdapi/v1/{path}").json() is None
    assert app_client.post("/sdapi/v1/reload-checkpoint").json() == {}


def test_progress_interrupt_skip_memory_and_flags(make_client, settings_factory) -> None:
    client = make_client(settings_factory(api_auth="user:s3cret"))
    auth = ("user", "s3cret")
    idle = client.get("/sdapi/v1/progress", auth=auth).json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and "current_image" in idle
    assert client.post("/sdapi/v1/interrupt", auth=auth).json() == {}
    assert client.post("/sdapi/v1/skip", auth=auth).json() is None
    ram = client.get("/sdapi/v1/memory", auth=auth).json()["ram"]
    assert ram["total"] > ram["free"] > 0 and ram["used"] == ram["total"] - ram["free"]
    flags = client.get("/sdapi/v1/cmd-flags", auth=auth)
    assert flags.json()["api"] is True and flags.json()["api_auth"] and "s3cret" not in flags.text


def test_post_back_the_whole_options_dict_and_persist(make_client, settings_factory) -> None:
    settings = settings_factory()
    client = make_client(settings)
    options = client.get("/sdapi/v1/options").json()
    options.update(jpeg_quality=91, emphasis="No norm", some_unknown_key="x")
    resp = client.post("/sdapi/v1/options", json=options)
    assert resp.status_code == 200 and resp.json() is None
    model = client.get("/sdapi/v1/sd-models").json()[0]
    for alias in (model["title"], model["model_name"], model["hash"], model["sha256"]):
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": alias}).status_code == 200
    bad = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl.safetensors"})
    assert bad.status_code == 400 and set(bad.json()) == A1111_ERROR_KEYS and "sdxl" in bad.json()["detail"]
    restarted = make_client(settings).get("/sdapi/v1/options").json()
    assert restarted["jpeg_quality"] == 91 and restarted["emphasis"] == "No norm"
    assert "some_unknown_key" not in restarted and restarted["sd_model_checkpoint"] == model["title"]


def test_capabilities_endpoint_serves_the_table(app_client) -> None:
    table = app_client.get("/capabilities").json()
    assert table["image_size"] == {"width": 512, "height": 512} and table["policy"] == "lenient"
    assert any(row["field"] == "steps" for row in table["rows"])


def test_infotext_field_fills_unset_fields(app_client) -> None:
    infotext = (
        "a castle\nNegative prompt: fog\nSteps: 2, Sampler: LCM, CFG scale: 1.5, Seed: 4242, Size: 512x512"
    )
    body = app_client.post("/sdapi/v1/txt2img", json={"infotext": infotext, "steps": 3}).json()
    info = json.loads(body["info"])
    assert (info["prompt"], info["negative_prompt"], info["seed"]) == ("a castle", "fog", 4242)
    assert (info["steps"], info["cfg_scale"]) == (3, 1.5)


ODD_VALUES = ["Infinity", "NaN", '"abc"', "[]", "{}", "-1", "1e308", "null"]
ODD_FIELDS = ["steps", "width", "seed", "cfg_scale", "batch_size", "denoising_strength", "subseed_strength",
              "resize_mode", "init_images", "override_settings", "styles", "eta"]


@pytest.mark.parametrize("route", ["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/generate"])
def test_odd_values_get_a_client_error_never_a_500(app_client, route: str) -> None:
    """Wrong types and non-finite numbers in any field: a JSON 4xx or a generated image, never a 5xx."""
    mode = "img2img" if "img2img" in route else "txt2img"
    for field in ODD_FIELDS:
        for value in ODD_VALUES:
            body = f'{{"mode": "{mode}", "prompt": "a fox", "n_iter": 1, "{field}": {value}}}'
            resp = app_client.post(route, content=body, headers={"Content-Type": "application/json"})
            assert resp.status_code < 500, (field, value, resp.text[:200])
            assert isinstance(resp.json(), dict)


def test_img2img_info_reports_the_steps_that_ran(app_client) -> None:
    """denoising_strength 0.5 of a 4-step schedule runs 2 steps: info.steps says 2; the infotext keeps
    A1111's meaning (the schedule's steps next to the strength), so it reproduces the image."""
    body = app_client.post("/sdapi/v1/img2img", json={
        "prompt": "p", "init_images": [png_b64()], "seed": 5, "steps": 4, "denoising_strength": 0.5}).json()
    info = json.loads(body["info"])
    assert info["steps"] == 2
    assert "Steps: 4," in info["infotexts"][0] and "Denoising strength: 0.5" in info["infotexts"][0]
    again = app_client.post("/sdapi/v1/img2img", json={
        "init_images": [png_b64()], "infotext": info["infotexts"][0]}).json()
    assert np.array_equal(pixels(again["images"][0]), pixels(body["images"][0]))


def test_posting_options_back_does_not_pin_settings(make_client, settings_factory) -> None:
    """Open WebUI posts the whole GET dict back: only what it changed is kept across restarts, so the
    service's own settings (live previews) still apply after a restart with other flags."""
    client = make_client(settings_factory())
    options = client.get("/sdapi/v1/options").json()
    assert options["live_previews_enable"] is False
    assert client.post("/sdapi/v1/options", json={**options, "jpeg_quality": 93}).status_code == 200
    restarted = make_client(settings_factory(live_previews=True, show_progress_every_n_steps=2))
    now = restarted.get("/sdapi/v1/options").json()
    assert now["live_previews_enable"] is True and now["show_progress_every_n_steps"] == 2
    assert now["jpeg_quality"] == 93
