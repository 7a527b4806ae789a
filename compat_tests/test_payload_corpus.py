"""The payload corpus: every recorded client body and A1111's defaults succeed with the predicted warnings."""

from __future__ import annotations

import json

import pytest
import requests

from compat_tests.helpers import (
    all_payload_names,
    assert_model_image,
    decode_image,
    inject_images,
    load_payload,
    response_warnings,
    warnings_about,
    warnings_naming,
)


def _params():
    for name in all_payload_names():
        client = load_payload(name)["client"]
        yield pytest.param(name, id=name, marks=pytest.mark.client(client))


@pytest.fixture(scope="module")
def capabilities(target) -> dict:
    """GET /capabilities: the table the expectations in payloads/ were written for (lenient, guidance on)."""
    r = requests.get(target.url("/capabilities"), auth=target.auth, timeout=30)
    assert r.status_code == 200, f"/capabilities -> {r.status_code}"
    caps = r.json()
    if caps.get("policy") == "strict":
        pytest.skip("the server runs strict: every clamp the corpus predicts as a warning is a 422 there")
    return caps


def _expectations(payload: dict, body: dict, caps: dict) -> tuple[list[str], list[str]]:
    """The payload's expected / forbidden warning fields, adjusted for a server that runs guidance=off
    and for the steps the server's models allow (`max_steps`: 4 with the four published time rows,
    MAX_STEPS with a time table; the payloads are written for the demo pack, which has a table)."""
    expected = list(payload["expect_warnings_about"])
    forbidden = list(payload.get("expect_no_warnings_about", []))
    steps = body.get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        clamped = not 1 <= steps <= caps["max_steps"]
        expected = [f for f in expected if f != "steps"] + (["steps"] if clamped else [])
        forbidden = [f for f in forbidden if f != "steps"] + ([] if clamped else ["steps"])
    if caps.get("guidance") == "off" and str(body.get("negative_prompt") or "").strip():
        # guidance=off: a negative prompt never has an effect, and the table says so
        forbidden = [f for f in forbidden if f != "negative_prompt"]
        expected = [*expected, "negative_prompt"] if "negative_prompt" not in expected else expected
    return expected, forbidden


def test_corpus_is_consistent():
    """Every payload names its client, route and source; a field is never both expected and forbidden."""
    for name in all_payload_names():
        payload = load_payload(name)
        assert {"client", "route", "source", "expect_warnings_about", "body"} <= payload.keys(), name
        assert payload["route"] in ("/generate", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"), name
        both = set(payload["expect_warnings_about"]) & set(payload.get("expect_no_warnings_about", []))
        assert not both, f"{name}: {sorted(both)} both expected and forbidden"
        if payload["route"] == "/sdapi/v1/img2img" or payload["body"].get("mode") == "img2img":
            assert "<init_image" in json.dumps(payload["body"]), f"{name}: img2img without an init image"


@pytest.mark.parametrize("name", list(_params()))
def test_payload(name, target, init_image, capabilities):
    """POST the stored body; 200, decodable 512x512 images, and exactly the capability table's warnings."""
    payload = load_payload(name)
    route, body = payload["route"], inject_images(payload["body"], init_image)
    r = requests.post(target.url(route), json=body, auth=target.auth, timeout=120)
    assert r.status_code == 200, f"{route} -> {r.status_code}: {r.text[:600]}"
    data = r.json()
    n_expected = payload.get("expect_images",
                             (body.get("batch_size") or 1) * (body.get("n_iter") or 1))
    if route == "/generate":
        assert data.get("status") == "ok", data
        images = data.get("images") or [data["base64"]]
        assert_model_image(decode_image(data["base64"]))
        assert data["seeds"][0] == data["seed"] and len(data["seeds"]) == len(images)
        if isinstance(body.get("seed"), int) and body["seed"] >= 0:
            assert data["seed"] == body["seed"], "the seed sent is not the seed reported"
    else:
        images = data["images"]
        assert all(not b64.startswith("data:") for b64 in images), "images must be raw base64 (no prefix)"
        info = json.loads(data["info"])
        assert len(info["infotexts"]) == len(images), "one infotext per returned image"
        assert len(info["all_seeds"]) == len(images), "one seed per returned image"
        if isinstance(body.get("seed"), int) and body["seed"] >= 0:
            assert info["seed"] == body["seed"], "the seed sent is not info.seed"
        assert info["sampler_name"] == "LCM" and (info["width"], info["height"]) == (512, 512)
    assert len(images) == n_expected, f"{len(images)} images returned, expected {n_expected}"
    for b64 in images:
        assert_model_image(decode_image(b64))

    warnings = response_warnings(route, data)
    expected, forbidden = _expectations(payload, body, capabilities)
    missing = [f for f in expected if not warnings_about(warnings, f)]
    assert not missing, f"no warning naming {missing}; warnings were {warnings}"
    unexpected = {f: warnings_naming(warnings, f) for f in forbidden}
    unexpected = {f: w for f, w in unexpected.items() if w}
    assert not unexpected, f"warnings about fields sent at values the table accepts: {unexpected}"
    unpredicted = [w for w in warnings if not any(f.lower() in str(w).lower() for f in expected)]
    assert not unpredicted, f"warnings the capability table does not predict for this body: {unpredicted}"
