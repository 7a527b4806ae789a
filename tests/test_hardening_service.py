"""Issue 13, the service-side classes: a failed options write changes nothing (7), generation waits
for the model load (9), init_images are capped and decoded lazily (5), and the OpenAPI spec tells
the truth (10: schemathesis over our own /openapi.json, every route of a demo-pack app)."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pi_axera_sd_service.api.app import create_app
from pi_axera_sd_service.runtime.session import ModelLoadError
from pi_axera_sd_service.service.engine import Engine

# Examples per operation and mode: the whole spec runs in well under a minute (20: ~20 s here).
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
CALL_TIMEOUT_S = 60   # one fuzzed call; none comes near it (a hang fails the test)
GATE_S = 30   # how long a gated load waits for its release before the test is declared hung


def png_b64(colour: str = "teal", size: tuple[int, int] = (64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------- class 7: options write
def _state_under_a_file(tmp_path: Path) -> Path:
    """A state_dir below a regular file: mkdir fails with ENOTDIR, for root too."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    return blocker / "state"


def _state_whose_options_file_is_a_dir(tmp_path: Path) -> Path:
    """options.json is a directory: the atomic rename fails (EISDIR), for root too."""
    state = tmp_path / "state_with_dir"
    (state / "options.json").mkdir(parents=True)
    return state


@pytest.mark.parametrize("make_state", [_state_under_a_file, _state_whose_options_file_is_a_dir])
def test_an_options_write_that_fails_names_the_path_and_changes_nothing(
    make_state: Callable[[Path], Path], make_client, settings_factory, tmp_path: Path
) -> None:
    state = make_state(tmp_path)
    client = make_client(settings_factory(state_dir=state))
    before = client.get("/sdapi/v1/options").json()

    resp = client.post("/sdapi/v1/options", json={"jpeg_quality": 33, "samples_format": "webp"})

    assert resp.status_code == 500
    body = resp.json()
    assert body["error"] == "OSError" and str(state / "options.json") in body["detail"]
    assert "nothing was changed" in body["detail"]
    assert client.get("/sdapi/v1/options").json() == before   # not live either
    assert not list(state.glob(".options-*")) if state.is_dir() else True   # no temp file left


def test_an_options_write_that_succeeds_is_live_and_persisted(make_client, settings_factory, tmp_path):
    state = tmp_path / "fresh" / "state"
    client = make_client(settings_factory(state_dir=state))
    assert client.post("/sdapi/v1/options", json={"jpeg_quality": 33}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["jpeg_quality"] == 33
    assert json.loads((state / "options.json").read_text()) == {"jpeg_quality": 33}


# ---------------------------------------------------------------------------- class 9: start-up window
class GatedEngine(Engine):
    """An engine whose load waits for `release`; `fail` makes the load fail; `waiting` is set when a
    request starts waiting for the load."""

    def __init__(self, *args: Any, fail: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.waiting = threading.Event()
        self.fail = fail

    def start(self) -> None:
        assert self.release.wait(GATE_S), "the test never released the load"
        if self.fail:
            raise ModelLoadError("unet: simulated load failure")
        super().start()

    async def wait_ready(self, timeout: float) -> None:
        self.waiting.set()
        await super().wait_ready(timeout)


GENERATION_CALLS = {
    "/generate": ("/generate", {"mode": "txt2img", "prompt": "a fox", "seed": 1, "steps": 1}),
    "txt2img": ("/sdapi/v1/txt2img", {"prompt": "a fox", "seed": 1, "steps": 1}),
    "img2img": ("/sdapi/v1/img2img", {"prompt": "a fox", "seed": 1, "steps": 1, "init_images": [png_b64()],
                                      "denoising_strength": 0.5}),
}


def _post_in_thread(client: TestClient, path: str, body: dict[str, Any]) -> tuple[threading.Thread, list]:
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(client.post(path, json=body)))
    thread.start()
    return thread, answers


@pytest.mark.parametrize("fail", [False, True], ids=["load succeeds", "load fails"])
@pytest.mark.parametrize("route", list(GENERATION_CALLS))
def test_generation_waits_for_the_model_load(route: str, fail: bool, demo_models, settings_factory) -> None:
    settings = settings_factory()
    engine = GatedEngine(settings, models=demo_models, fail=fail)
    path, body = GENERATION_CALLS[route]
    with TestClient(create_app(settings, engine, load_in_background=True)) as client:
        thread, answers = _post_in_thread(client, path, body)
        assert engine.waiting.wait(GATE_S)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        assert client.get("/sdapi/v1/options").status_code == 503   # probes are not held
        engine.release.set()
        thread.join(GATE_S)
        assert not thread.is_alive()
    resp = answers[0]
    if not fail:
        assert resp.status_code == 200, resp.text
        return
    assert resp.status_code == 503
    text = resp.json().get("detail") or resp.json().get("error")
    assert "failed to load" in text and "simulated load failure" in text


@pytest.mark.parametrize(("route", "body"), [
    ("/generate", {"status": "error", "error": "Models are still loading"}),
    ("txt2img", {"error": "NotReadyError", "detail": "Models are still loading", "body": "",
                 "errors": "503: Models are still loading"}),
])
def test_a_load_longer_than_queue_timeout_answers_503_with_retry_after(
    route: str, body: dict[str, Any], demo_models, settings_factory
) -> None:
    settings = settings_factory(queue_timeout=0.2)
    engine = GatedEngine(settings, models=demo_models)
    path, payload = GENERATION_CALLS[route]
    with TestClient(create_app(settings, engine, load_in_background=True)) as client:
        resp = client.post(path, json=payload)
        engine.release.set()
    assert (resp.status_code, resp.headers["Retry-After"], resp.json()) == (503, "5", body)


# ---------------------------------------------------------------------------- class 5: init_images
@pytest.mark.parametrize(("body", "status", "needle"), [
    # more images than the batch: A1111 refuses too ("bad number of images passed"); nothing decoded
    ({"init_images": ["not base64 at all"] * 3, "batch_size": 2}, 400, "init_images has 3 images"),
    ({"init_images": ["x"] * 500}, 400, "batch_size is 1"),
    ({"init_images": []}, 404, "Init image not found"),
    ({"init_images": "a string, not a list"}, 422, None),
    # as many as the batch: each one is decoded, so a bad one is named
    ({"init_images": [png_b64(), "bm90IGFuIGltYWdl"], "batch_size": 2}, 400, "init_images[1]"),
])
def test_init_images_beyond_the_batch_are_refused_before_decoding(
    app_client, body: dict[str, Any], status: int, needle: str | None
) -> None:
    resp = app_client.post("/sdapi/v1/img2img", json={"prompt": "p", "steps": 1, **body})
    assert resp.status_code == status, resp.text
    if needle:
        assert needle in resp.json()["detail"]


def test_init_images_past_max_images_per_request_are_never_decoded(make_client, settings_factory) -> None:
    """batch_size 3 is clamped to 2 images: the third init image is not used, so not even decoded."""
    client = make_client(settings_factory(max_images_per_request=2))
    resp = client.post("/sdapi/v1/img2img", json={
        "prompt": "p", "steps": 1, "seed": 1, "batch_size": 3, "denoising_strength": 0.5,
        "init_images": [png_b64("red"), png_b64("blue"), "this one is never decoded"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["images"]) == 2
    assert any("the rest were not used" in w for w in json.loads(body["info"])["warnings"])


# ---------------------------------------------------------------------------- class 10: OpenAPI truth
@pytest.fixture()
def demo_app_schema(live_server, settings_factory):
    """Our own /openapi.json, served by a demo-pack app under uvicorn on 127.0.0.1 (real HTTP, so
    every call can time out: a hang is a failure, not a stuck test)."""
    server = live_server(settings_factory(max_images_per_request=2, queue_timeout=30))
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


# The issue's bar: no 5xx, and every answer as the spec says. Not "every schema-valid body is
# accepted": the capability table refuses some values the A1111 schema allows (declared as 422).
def no_server_fault(ctx, response, case) -> bool | None:
    """not_a_server_error, except a 501 the spec declares (interrogate: no CLIP models, by design)."""
    if response.status_code == 501 and "501" in case.operation.definition.raw.get("responses", {}):
        return True
    return not_a_server_error(ctx, response, case)


FUZZ_CHECKS = [no_server_fault, status_code_conformance, content_type_conformance,
               response_schema_conformance]


def fuzz_failures(schema, mode: GenerationMode, examples: int) -> dict[str, str]:
    """{operation: what failed} after `examples` generated calls of every operation in `schema`.

    (schemathesis' own pytest loader does not run under pytest 9, so each operation gets its own
    hypothesis run here; every failing operation is reported, not just the first.)"""
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 30
    for operation in operations:

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=True)
        def call(case) -> None:
            case.call_and_validate(checks=FUZZ_CHECKS, timeout=CALL_TIMEOUT_S)

        try:
            call()
        except Unsatisfiable:   # negative mode on an operation with no parameters and no body
            continue
        except BaseException as exc:   # schemathesis' FailureGroup is a BaseExceptionGroup
            if not isinstance(exc, Exception) and not hasattr(exc, "exceptions"):
                raise   # KeyboardInterrupt and the like
            failures[operation.label] = str(exc)[:2000]
    return failures


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_route_answers_what_its_openapi_spec_says(demo_app_schema, mode: GenerationMode) -> None:
    """No 5xx, every status, body and content type as declared, on every operation of the spec."""
    failures = fuzz_failures(demo_app_schema, mode, FUZZ_EXAMPLES)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())


def test_with_api_auth_every_route_declares_the_401_it_sends(live_server, settings_factory) -> None:
    """The spec (fetched with credentials) against calls without them: 401s (and the open /health,
    /internal/ping) exactly as declared."""
    server = live_server(settings_factory(api_auth="user:secret"))
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", auth=("user", "secret"))
    failures = fuzz_failures(schema, GenerationMode.POSITIVE, 2)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
