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


@pytest.mark.parametrize("name", list(_params()))
def test_payload(name, target, init_image):
    """POST the stored body; 200, decodable 512x512 images, and the capability table's warnings."""
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
    else:
        images = data["images"]
        info = json.loads(data["info"])
        assert len(info["infotexts"]) == len(images), "one infotext per returned image"
        assert len(info["all_seeds"]) == len(images), "one seed per returned image"
    assert len(images) == n_expected, f"{len(images)} images returned, expected {n_expected}"
    for b64 in images:
        assert_model_image(decode_image(b64))

    warnings = response_warnings(route, data)
    missing = [f for f in payload["expect_warnings_about"] if not warnings_about(warnings, f)]
    assert not missing, f"no warning naming {missing}; warnings were {warnings}"
    unexpected = {f: warnings_naming(warnings, f) for f in payload.get("expect_no_warnings_about", [])}
    unexpected = {f: w for f, w in unexpected.items() if w}
    assert not unexpected, f"warnings about fields sent at their defaults: {unexpected}"
