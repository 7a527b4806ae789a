"""POST /generate on the demo pack: the upstream contract, as picker and pi_axera_sd_interactive use it."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pi_axera_sd_service.pipeline.stages import StageError
from pi_axera_sd_service.service.queue import QueueFullError


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert img.format == "PNG"
    return img


def png_b64(colour: str = "orange", size: tuple[int, int] = (320, 240)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_txt2img_returns_the_contract_and_is_deterministic_by_seed(app_client) -> None:
    body = {"mode": "txt2img", "prompt": "a lighthouse", "seed": 1234}
    first = app_client.post("/generate", json=body)
    assert first.status_code == 200, first.text
    data = first.json()
    assert data["status"] == "ok" and data["seed"] == 1234 and data["seeds"] == [1234]
    assert "images" not in data and "path" not in data   # one image is sent once, as `base64`
    assert data["total_time_ms"] >= data["text_time_ms"] >= 0 and data["warnings"] == []
    img = decode(data["base64"])
    assert img.size == (512, 512) and "Seed: 1234" in img.info["parameters"]
    again = app_client.post("/generate", json=body).json()
    other = app_client.post("/generate", json={**body, "seed": 1235}).json()
    assert np.array_equal(np.asarray(decode(again["base64"])), np.asarray(img))
    assert not np.array_equal(np.asarray(decode(other["base64"])), np.asarray(img))


def test_random_seed_and_seed_plus_i_across_a_batch(app_client) -> None:
    data = app_client.post(
        "/generate", json={"mode": "txt2img", "prompt": "x", "seed": -1, "batch_size": 2}
    ).json()
    assert len(data["images"]) == 2 and data["images"][0] == data["base64"] and 0 <= data["seed"] < 2**32
    assert data["seeds"] == [data["seed"], data["seed"] + 1]
    single = app_client.post(
        "/generate", json={"mode": "txt2img", "prompt": "x", "seed": data["seeds"][1]}
    ).json()
    assert np.array_equal(np.asarray(decode(single["base64"])), np.asarray(decode(data["images"][1])))


def test_one_image_answer_is_the_base64_png_plus_the_fields(app_client) -> None:
    """One image travels once: the answer is within 5% of the base64 PNG plus the other fields."""
    resp = app_client.post("/generate", json={"mode": "txt2img", "prompt": "a lighthouse", "seed": 3})
    data = resp.json()
    fields = {key: value for key, value in data.items() if key != "base64"}
    expected = len(data["base64"]) + len(json.dumps(fields))
    assert "images" not in data and len(data["base64"]) > 100_000
    assert len(resp.content) <= 1.05 * expected, (len(resp.content), expected)


def test_return_images_asks_for_the_images_list_of_one_image(app_client) -> None:
    body = {"mode": "txt2img", "prompt": "a lighthouse", "seed": 3, "return_images": True}
    data = app_client.post("/generate", json=body).json()
    assert data["images"] == [data["base64"]]
    bad = app_client.post("/generate", json={**body, "return_images": "sometimes"})
    assert bad.status_code == 400 and "return_images" in bad.json()["error"]


def test_picker_payload_with_both_init_fields_runs_img2img_with_warnings(app_client) -> None:
    init = png_b64()
    picker = {
        "prompt": "adult, face portrait photograph, 8k, realistic",
        "negative_prompt": "white background",
        "seed": -1,
        "steps": 7,
        "width": 512,
        "height": 512,
        "cfg_scale": 1.5,
        "sampler_name": "DPM++ 2M Karras",
        "denoising_strength": 0.5,
        "n_iter": 1,
        "batch_size": 1,
        "mode": "img2img",
        "init_image": init,
        "init_images": [init],
    }
    resp = app_client.post("/generate", json=picker)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert decode(data["base64"]).size == (512, 512)   # the picker's fallback once `images` is absent
    warnings = " ".join(data["warnings"])
    assert "steps" not in warnings and "DPM++ 2M" in warnings   # steps 7 run: the demo pack has a time table
    info = decode(data["base64"]).info["parameters"]
    assert "Steps: 7," in info and "Denoising strength: 0.5" in info and "CFG scale: 1.5" in info


@pytest.mark.parametrize("field", ["init_image", "init_images"])
def test_img2img_accepts_raw_base64_data_uri_and_the_strength_alias(app_client, field: str) -> None:
    uri = "data:image/png;base64," + png_b64("teal")
    value = [uri] if field == "init_images" else uri
    resp = app_client.post(
        "/generate",
        json={"mode": "img2img", "prompt": "p", field: value, "strength": 0.25, "resize_mode": 1, "seed": 5},
    )
    assert resp.status_code == 200, resp.text
    assert "Denoising strength: 0.25" in decode(resp.json()["base64"]).info["parameters"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "p"}, "mode"),
        ({"mode": "upscale", "prompt": "p"}, "mode"),
        ({"mode": "txt2img"}, "prompt"),
        ({"mode": "txt2img", "prompt": "   "}, "prompt"),
        ({"mode": "txt2img", "prompt": "p", "seed": "abc"}, "seed"),
        ({"mode": "txt2img", "prompt": "p", "steps": "many"}, "steps"),
        ({"mode": "img2img", "prompt": "p"}, "init_image"),
        ({"mode": "img2img", "prompt": "p", "init_image": "bm90IGFuIGltYWdl"}, "init_image"),
        ({"mode": "img2img", "prompt": "p", "init_image": png_b64(), "resize_mode": 9}, "resize_mode"),
    ],
)
def test_bad_requests_are_400_naming_the_field(app_client, body: dict, needle: str) -> None:
    resp = app_client.post("/generate", json=body)
    assert resp.status_code == 400
    data = resp.json()
    assert data["status"] == "error" and needle in data["error"]


def test_non_json_body_is_a_400(app_client) -> None:
    resp = app_client.post("/generate", content=b"not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["status"] == "error"


def test_strict_capability_rejection_is_a_400_on_generate(make_client, settings_factory) -> None:
    client = make_client(settings_factory(strict=True))
    resp = client.post("/generate", json={"mode": "txt2img", "prompt": "p", "steps": 9})
    assert resp.status_code == 400 and "steps" in resp.json()["error"]
    assert client.post("/generate", json={"mode": "txt2img", "prompt": "p", "steps": 2}).status_code == 200


def test_save_outputs_writes_the_file_and_returns_path(make_client, settings_factory, tmp_path: Path) -> None:
    client = make_client(settings_factory(save_outputs=True, output_dir=tmp_path / "saved"))
    data = client.post("/generate", json={"mode": "txt2img", "prompt": "p", "seed": 9}).json()
    path = Path(data["path"])
    assert path.parent == tmp_path / "saved" and path.read_bytes() == base64.b64decode(data["base64"])
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_server_faults_are_5xx_in_the_generate_shape(app_client, monkeypatch) -> None:
    engine = app_client.app.state.engine

    async def queue_full(req, is_disconnected=None):
        raise QueueFullError("queue is full", retry_after=7)

    monkeypatch.setattr(engine, "submit", queue_full)
    resp = app_client.post("/generate", json={"mode": "txt2img", "prompt": "p"})
    assert resp.status_code == 503 and resp.headers["retry-after"] == "7"
    assert resp.json() == {"status": "error", "error": "queue is full"}

    async def stage_failed(req, is_disconnected=None):
        raise StageError("unet", "axclrt run failed")

    monkeypatch.setattr(engine, "submit", stage_failed)
    resp = app_client.post("/generate", json={"mode": "txt2img", "prompt": "p"})
    assert resp.status_code == 500 and "unet" in resp.json()["error"]


def test_an_unexpected_fault_is_a_500_in_the_generate_shape(app_client, monkeypatch) -> None:
    engine = app_client.app.state.engine

    async def broken(req, is_disconnected=None):
        raise RuntimeError("something unforeseen")

    monkeypatch.setattr(engine, "submit", broken)
    client = TestClient(app_client.app, raise_server_exceptions=False)
    resp = client.post("/generate", json={"mode": "txt2img", "prompt": "p"})
    assert resp.status_code == 500 and resp.json()["status"] == "error" and resp.json()["error"]
    sdapi = client.post("/sdapi/v1/txt2img", json={"prompt": "p"})
    assert sdapi.status_code == 500 and sdapi.json()["error"] == "RuntimeError"


def test_an_undecodable_init_image_names_the_field_as_sent(app_client) -> None:
    resp = app_client.post("/generate", json={"mode": "img2img", "prompt": "p", "init_image": "bm90IGFu"})
    assert resp.status_code == 400 and resp.json()["error"].startswith("Invalid encoded image (init_image)")
