"""HTTP Basic auth, CORS exposure and input limits on the real server; refusals never reach the NPU."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import pytest
from PIL import Image

TXT2IMG = "/sdapi/v1/txt2img"
SMALL = {"prompt": "a quiet lake", "steps": 1, "cfg_scale": 1}


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture()
def auth_server(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory()
    return live_server(settings_factory(api_auth="alice:s3cret,bob:hunter2"), wrap), wrap


@pytest.mark.parametrize("route", [TXT2IMG, "/generate"])
@pytest.mark.parametrize("headers", [{}, basic("alice", "wrong"), basic("mallory", "s3cret"),
                                     {"Authorization": "Bearer s3cret"}, {"Authorization": ""}])
def test_missing_or_wrong_credentials_get_401(auth_server, route, headers):
    server, wrap = auth_server
    response = httpx.post(server.url + route, json=SMALL, headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Basic"
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert body["detail"] in ("Not authenticated", "Incorrect username or password")
    assert wrap.calls("text_encoder") == 0


def test_right_credentials_pass_and_probes_stay_open(auth_server):
    server, _ = auth_server
    for user, password in (("alice", "s3cret"), ("bob", "hunter2")):
        ok = httpx.post(server.url + TXT2IMG, json=SMALL, headers=basic(user, password), timeout=30)
        assert ok.status_code == 200 and ok.json()["images"]
    assert httpx.get(server.url + "/internal/ping", timeout=5).status_code == 200
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    assert httpx.get(server.url + "/sdapi/v1/progress", timeout=5).status_code == 401
    assert httpx.get(server.url + "/metrics", timeout=5).status_code == 401


def test_auth_health_protects_the_probes_too(live_server, settings_factory):
    server = live_server(settings_factory(api_auth="alice:s3cret", auth_health=True))
    assert httpx.get(server.url + "/health", timeout=5).status_code == 401
    assert httpx.get(server.url + "/health", headers=basic("alice", "s3cret"), timeout=5).status_code == 200


@pytest.mark.parametrize("header", ["", "Basic", "Basic Og==", "Bearer whatever"])
def test_auth_off_ignores_any_authorization_header(live_server, settings_factory, header):
    server = live_server(settings_factory())
    response = httpx.post(server.url + TXT2IMG, json=SMALL, headers={"Authorization": header}, timeout=30)
    assert response.status_code == 200 and response.json()["images"]


def test_cors_off_by_default_and_on_when_configured(live_server, settings_factory):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    closed = live_server(settings_factory())
    response = httpx.options(closed.url + TXT2IMG, headers=preflight, timeout=5)
    assert "access-control-allow-origin" not in response.headers
    opened = live_server(settings_factory(cors_allow_origins="http://ui.example"))
    response = httpx.options(opened.url + TXT2IMG, headers=preflight, timeout=5)
    assert response.headers["access-control-allow-origin"] == "http://ui.example"


def test_oversize_body_413_by_length_and_by_stream(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory()
    server = live_server(settings_factory(max_body_bytes=100_000), wrap)
    big = {**SMALL, "negative_prompt": "x" * 150_000}
    declared = httpx.post(server.url + TXT2IMG, json=big, timeout=10)
    assert declared.status_code == 413
    assert "max_body_bytes=100000" in declared.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        payload = httpx.Request("POST", "http://x", json=big).content
        for start in range(0, len(payload), 16_384):
            yield payload[start:start + 16_384]

    streamed = httpx.post(server.url + TXT2IMG, content=chunks(), timeout=10,
                          headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "max_body_bytes" in streamed.json()["detail"]
    assert wrap.calls("text_encoder") == 0
    assert httpx.get(server.url + "/sdapi/v1/progress", timeout=5).json()["state"]["job_count"] == 0
    assert httpx.post(server.url + TXT2IMG, json=SMALL, timeout=30).status_code == 200


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's signature)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("side", [8_000, 50_000])  # over our limit; over Pillow's own bomb limit too
def test_decompression_bomb_400_without_the_worker_noticing(live_server, settings_factory, wrap_factory,
                                                             side):
    wrap = wrap_factory()
    server = live_server(settings_factory(), wrap)
    bomb = base64.b64encode(png_claiming_size(side, side)).decode()
    response = httpx.post(server.url + "/sdapi/v1/img2img",
                          json={**SMALL, "init_images": [bomb], "denoising_strength": 0.5}, timeout=10)
    assert response.status_code == 400
    if side * side < Image.MAX_IMAGE_PIXELS * 2:
        assert "max_init_image_pixels" in response.json()["detail"]
    assert wrap.calls("vae_encoder") == 0 and wrap.calls("text_encoder") == 0
    assert httpx.get(server.url + "/health", timeout=5).json()["busy"] is False


def test_prompt_too_long_is_refused_naming_the_setting(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory()
    server = live_server(settings_factory(max_prompt_chars=50), wrap)
    response = httpx.post(server.url + TXT2IMG, json={**SMALL, "prompt": "y" * 51}, timeout=10)
    assert 400 <= response.status_code < 500
    assert "max_prompt_chars" in response.json()["detail"]
    assert wrap.calls("text_encoder") == 0


def test_refusals_are_counted_under_the_route_they_were_for(live_server, settings_factory):
    """401 and 413 happen before routing; /metrics still labels them with the route template."""
    from prometheus_client.parser import text_string_to_metric_families

    server = live_server(settings_factory(api_auth="alice:s3cret", max_body_bytes=10_000))
    assert httpx.get(server.url + "/sdapi/v1/options", timeout=5).status_code == 401
    too_big = {**SMALL, "prompt": "x" * 20_000}
    assert httpx.post(server.url + TXT2IMG, json=too_big, headers=basic("alice", "s3cret"),
                      timeout=5).status_code == 413
    text = httpx.get(server.url + "/metrics", headers=basic("alice", "s3cret"), timeout=5).text
    samples = {(s.labels["route"], s.labels["method"], s.labels["status"])
               for family in text_string_to_metric_families(text) if family.name == "sd_http_requests"
               for s in family.samples if s.name == "sd_http_requests_total"}
    assert ("/sdapi/v1/options", "GET", "401") in samples
    assert (TXT2IMG, "POST", "413") in samples


def test_401_and_413_bodies_match_the_other_a1111_errors(live_server, settings_factory):
    server = live_server(settings_factory(api_auth="alice:s3cret", max_body_bytes=10_000))
    unauthorized = httpx.get(server.url + "/sdapi/v1/options", timeout=5).json()
    assert unauthorized["errors"] == "401: Not authenticated"
    too_big = httpx.post(server.url + TXT2IMG, json={"prompt": "x" * 20_000},
                         headers=basic("alice", "s3cret"), timeout=5).json()
    assert too_big["errors"].startswith("413: ") and too_big["error"] == "HTTPException"
