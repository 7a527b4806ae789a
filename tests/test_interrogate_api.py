"""/sdapi/v1/interrogate and /interrogate/structured end to end on the demo pack's CLIP graphs:
answers, errors, the shared NPU queue, and the tag cache built in slices between jobs."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pi_axera_sd_service.runtime.clip_models import TAGS_FILE
from pi_axera_sd_service.runtime.session import Session
from pi_axera_sd_service.settings import Settings

RED, GREEN, BLUE = (210, 30, 35), (35, 170, 45), (25, 45, 200)
PICKER_CATEGORIES = {  # knob titles and values like the picker's
    "Colour": ["red", "green", "blue", "yellow"],
    "Animal": ["cat", "dog"],
    "Place": ["forest", "ocean", "mountain", "house"],
}
GENERATION_ROLES = {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
WAIT_S = 60.0   # upper bound for a condition on a busy machine (never a margin the test relies on)


def png_b64(colour: tuple[int, int, int], size: tuple[int, int] = (320, 240)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Gate:
    """Holds one session call until released; `reached` is set when the call arrives."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()


class CallLog:
    """wrap(role, session) recording every call's role in order; gates hold chosen calls."""

    def __init__(self, gates: Mapping[tuple[str, int], Gate] | None = None):
        self.gates = dict(gates or {})
        self.order: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, role: str, session: Session) -> Session:
        return _LoggedSession(self, role, session)

    def record(self, role: str) -> None:
        with self._lock:
            self.order.append(role)
            call = self.order.count(role)
        gate = self.gates.get((role, call))
        if gate is not None:
            gate.reached.set()
            assert gate.release.wait(WAIT_S), f"{role} call {call} was never released"

    def calls(self, role: str) -> int:
        with self._lock:
            return self.order.count(role)


class _LoggedSession:
    def __init__(self, log: CallLog, role: str, inner: Session):
        self.log, self.role, self.inner = log, role, inner
        self.path, self.backend = inner.path, inner.backend
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.log.record(self.role)
        return self.inner.run(feed)


@contextmanager
def started_client(settings: Settings, demo_models: Any, wrap: Any = None) -> Iterator[TestClient]:
    """A TestClient whose engine stops when the block ends (for restarts within one test)."""
    from pi_axera_sd_service.api.app import create_app
    from pi_axera_sd_service.service.engine import Engine

    with TestClient(create_app(settings, Engine(settings, models=demo_models, wrap=wrap))) as client:
        yield client


def tag_status(client: TestClient) -> dict[str, Any]:
    return client.get("/capabilities").json()["interrogate"]


def wait_for_tags(client: TestClient) -> dict[str, Any]:
    wait_until(lambda: tag_status(client)["tags_prepared"] == tag_status(client)["tags"], "the tag cache")
    return tag_status(client)


# --- answers -------------------------------------------------------------------------------------


def test_a_red_image_is_tagged_red_with_raw_base64_and_data_uri(app_client) -> None:
    wait_for_tags(app_client)
    raw = png_b64(RED)
    for image in (raw, "data:image/png;base64," + raw):
        resp = app_client.post("/sdapi/v1/interrogate", json={"image": image, "model": "clip"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["caption"].split(", ")[0] == "red"
        assert body["interrogations"][0]["tag"] == "red" and 0 < body["interrogations"][0]["score"] <= 1
        assert "tags_complete" not in body  # the cache is complete: no progress keys


def test_model_defaults_to_clip_and_the_answer_follows_the_image(app_client) -> None:
    wait_for_tags(app_client)
    captions = [app_client.post("/sdapi/v1/interrogate", json={"image": png_b64(c)}).json()["caption"]
                for c in (GREEN, BLUE)]
    assert [caption.split(", ")[0] for caption in captions] == ["green", "blue"]


def test_picker_structured_request_gets_winners_from_its_labels(app_client) -> None:
    answers = {}
    for name, colour in (("red", RED), ("blue", BLUE)):
        resp = app_client.post("/sdapi/v1/interrogate/structured",
                               json={"image": png_b64(colour), "categories": PICKER_CATEGORIES})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body["results"]) == set(PICKER_CATEGORIES)
        for category, result in body["results"].items():
            assert result["winner"] in PICKER_CATEGORIES[category]
            assert 0.0 <= result["confidence"] <= 1.0
        assert isinstance(body["general_tags"], list)
        answers[name] = body["results"]["Colour"]["winner"]
    assert answers == {"red": "red", "blue": "blue"}


def test_capabilities_report_interrogation_and_the_tag_cache(app_client) -> None:
    status = wait_for_tags(app_client)
    assert status["available"] is True and status["reason"] is None and status["tags"] > 10


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "detail"), [
    ({}, 404, "Image not found"),
    ({"image": None, "model": "clip"}, 404, "Image not found"),
    ({"image": png_b64(RED), "model": "deepdanbooru"}, 404, "Model not found"),
    ({"image": png_b64(RED), "model": "blip"}, 404, "Model not found"),
    ({"image": "not an image!"}, 400, "Invalid encoded image"),
    ({"image": base64.b64encode(b"GIF89a not really").decode()}, 400, "cannot decode image"),
    ({"image": 42}, 400, "expected a base64 string"),
])
def test_interrogate_errors_in_a1111_shape(app_client, body: dict, status: int, detail: str) -> None:
    resp = app_client.post("/sdapi/v1/interrogate", json=body)
    assert resp.status_code == status
    answer = resp.json()
    assert set(answer) == {"error", "detail", "body", "errors"} and detail in answer["detail"]


@pytest.mark.parametrize(("categories", "named"), [
    ({f"c{i}": ["red"] for i in range(17)}, "interrogate_max_categories"),
    ({"colour": [f"label {i}" for i in range(51)]}, "interrogate_max_labels_per_category"),
    ({"colour": ["x" * 201]}, "interrogate_max_label_chars"),
    ({"colour": "red"}, "list of label strings"),
    (None, "non-empty object"),
    ({}, "non-empty object"),
])
def test_structured_limits_and_malformed_categories_are_400s(app_client, categories: Any, named: str) -> None:
    resp = app_client.post("/sdapi/v1/interrogate/structured",
                           json={"image": png_b64(RED), "categories": categories})
    assert resp.status_code == 400 and named in resp.json()["detail"]


def test_structured_bad_image_is_a_400(app_client) -> None:
    resp = app_client.post("/sdapi/v1/interrogate/structured",
                           json={"image": "AAAA", "categories": PICKER_CATEGORIES})
    assert resp.status_code == 400 and "Invalid encoded image" in resp.json()["detail"]


@pytest.mark.parametrize("path", ["/sdapi/v1/interrogate", "/sdapi/v1/interrogate/structured"])
def test_without_clip_models_both_routes_answer_501_with_the_reason(
    make_client, settings_factory, tmp_path: Path, path: str
) -> None:
    client = make_client(settings_factory(clip_vision_model=tmp_path / "nowhere.onnx"))
    resp = client.post(path, json={"image": png_b64(RED), "categories": PICKER_CATEGORIES})
    assert resp.status_code == 501
    assert "nowhere.onnx" in resp.json()["detail"] and resp.json()["error"] == "NotImplementedError"
    status = tag_status(client)
    assert status["available"] is False and "nowhere.onnx" in status["reason"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "still generates", "steps": 1}).status_code == 200


def test_a_clip_path_for_another_backend_turns_interrogation_off_not_the_service(
    make_client, settings_factory, tmp_path: Path
) -> None:
    client = make_client(settings_factory(clip_text_model=tmp_path / "clip_base_text.axmodel"))
    status = tag_status(client)
    assert status["available"] is False and "cannot run on the onnxruntime backend" in status["reason"]
    resp = client.post("/sdapi/v1/interrogate", json={"image": png_b64(RED)})
    assert resp.status_code == 501 and "clip_base_text.axmodel" in resp.json()["detail"]


def test_a_clip_session_fault_is_a_stage_failure_and_the_next_call_works(
    make_client, settings_factory, wrap_factory
) -> None:
    client = make_client(settings_factory(), wrap=wrap_factory(fail_calls={"clip_vision": {1}}))
    failed = client.post("/sdapi/v1/interrogate", json={"image": png_b64(RED)})
    assert failed.status_code == 500 and failed.json()["error"] == "StageError"
    assert "interrogate" in failed.json()["detail"] and "simulated runtime failure" in failed.json()["detail"]
    assert client.app.state.engine.progress_snapshot()["state"]["job"] == ""  # progress back to idle
    assert client.post("/sdapi/v1/interrogate", json={"image": png_b64(RED)}).status_code == 200
    metrics = client.get("/metrics").text
    assert 'sd_jobs_total{outcome="failed"} 1.0' in metrics and 'sd_jobs_total{outcome="ok"} 1.0' in metrics


# --- one NPU: the queue and the worker -----------------------------------------------------------


def _post_in_thread(client: TestClient, path: str, body: dict, into: dict, key: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.update({key: client.post(path, json=body)}), daemon=True)
    thread.start()
    return thread


def test_interrogation_waits_in_the_generation_queue_and_reports_progress(
    make_client, settings_factory
) -> None:
    unet, vision = Gate(), Gate()
    log = CallLog({("unet", 1): unet, ("clip_vision", 1): vision})
    client = make_client(settings_factory(max_queue=1), wrap=log)
    engine = client.app.state.engine
    wait_for_tags(client)
    answers: dict[str, Any] = {}
    threads = [_post_in_thread(client, "/sdapi/v1/txt2img", {"prompt": "a lake", "steps": 1}, answers, "gen")]
    assert unet.reached.wait(WAIT_S)
    threads.append(_post_in_thread(client, "/sdapi/v1/interrogate", {"image": png_b64(RED)}, answers, "tags"))
    wait_until(lambda: engine.queue.depth == 1, "the interrogation to queue")
    full = client.post("/sdapi/v1/interrogate", json={"image": png_b64(RED)})
    assert full.status_code == 503 and "queue is full" in full.json()["detail"]
    assert log.calls("clip_vision") == 0, "the interrogation ran before the generation ahead of it"
    unet.release.set()
    assert vision.reached.wait(WAIT_S)
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["state"]["job"] == "interrogate" and progress["state"]["job_count"] == 1
    vision.release.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert answers["gen"].status_code == 200 and answers["tags"].json()["caption"].startswith("red")
    assert log.order.index("clip_vision") > max(i for i, r in enumerate(log.order) if r == "vae_decoder")


def test_a_generation_submitted_while_the_cache_builds_waits_at_most_one_slice(
    make_client, settings_factory
) -> None:
    first_slice = Gate()
    log = CallLog({("clip_text", 1): first_slice})
    client = make_client(settings_factory(interrogate_build_slice=1), wrap=log)
    engine = client.app.state.engine
    assert first_slice.reached.wait(WAIT_S)  # the worker is inside the first slice of the tag cache
    answers: dict[str, Any] = {}
    thread = _post_in_thread(client, "/sdapi/v1/txt2img", {"prompt": "a lake", "steps": 2}, answers, "gen")
    wait_until(lambda: engine.queue.depth == 1, "the generation to queue")
    first_slice.release.set()
    thread.join(WAIT_S)
    assert answers["gen"].status_code == 200
    order = list(log.order)
    generation = [i for i, role in enumerate(order) if role in GENERATION_ROLES]
    assert order[0] == "clip_text" and generation == list(range(1, 1 + len(generation))), order[:12]
    status = wait_for_tags(client)  # the cache goes on building after the job
    assert log.calls("clip_text") == status["tags"]


def test_while_the_cache_builds_interrogate_answers_from_the_tags_ready_and_says_so(
    make_client, settings_factory
) -> None:
    second_slice = Gate()
    log = CallLog({("clip_text", 2): second_slice})
    client = make_client(settings_factory(interrogate_build_slice=1), wrap=log)
    engine = client.app.state.engine
    assert second_slice.reached.wait(WAIT_S)
    answers: dict[str, Any] = {}
    thread = _post_in_thread(client, "/sdapi/v1/interrogate", {"image": png_b64(RED)}, answers, "tags")
    wait_until(lambda: engine.queue.depth == 1, "the interrogation to queue")
    second_slice.release.set()
    thread.join(WAIT_S)
    body = answers["tags"].json()
    total = tag_status(client)["tags"]
    assert body["tags_complete"] is False and body["tags_prepared"] == f"2/{total}"  # ran right after slice 2
    assert body["interrogations"] and body["caption"]
    assert wait_for_tags(client)["tags_prepared"] == total
    assert "tags_complete" not in client.post("/sdapi/v1/interrogate", json={"image": png_b64(RED)}).json()


def test_the_tag_cache_is_built_once_survives_a_restart_and_follows_the_list(
    settings_factory, demo_models, demo_pack: Path, tmp_path: Path
) -> None:
    settings = settings_factory()
    red = {"image": png_b64(RED)}
    answers = []
    for start in range(2):
        log = CallLog()
        with started_client(settings, demo_models, log) as client:
            status = wait_for_tags(client)
            answers.append(client.post("/sdapi/v1/interrogate", json=red).json())
            assert log.calls("clip_text") == (status["tags"] if start == 0 else 0), f"start {start}"
    assert answers[0] == answers[1] and answers[0]["caption"].startswith("red")

    tags = (demo_pack / TAGS_FILE).read_text(encoding="utf-8").split()
    shorter = tmp_path / "tags.txt"
    shorter.write_text("\n".join(tags[:-1]) + "\n", encoding="utf-8")
    log = CallLog()
    with started_client(settings.model_copy(update={"interrogate_tags_file": shorter}), demo_models,
                        log) as client:
        status = wait_for_tags(client)
        assert status["tags"] == len(tags) - 1 and log.calls("clip_text") == len(tags) - 1


def test_serving_an_interrogation_imports_neither_torch_nor_transformers(
    demo_pack: Path, tmp_path: Path
) -> None:
    names = ("cache_dir", "state_dir", "output_dir")
    folders = ", ".join(f"{name}={str(tmp_path / name)!r}" for name in names)
    code = (
        "import base64, io, sys\n"
        "from fastapi.testclient import TestClient\n"
        "from PIL import Image\n"
        "from pi_axera_sd_service.api.app import create_app\n"
        "from pi_axera_sd_service.settings import Settings\n"
        f"settings = Settings(model_dir={str(demo_pack)!r}, backend='onnxruntime', {folders})\n"
        "buffer = io.BytesIO(); Image.new('RGB', (64, 64), (210, 30, 35)).save(buffer, format='PNG')\n"
        "image = base64.b64encode(buffer.getvalue()).decode()\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    assert client.post('/sdapi/v1/interrogate', json={'image': image}).status_code == 200\n"
        "    categories = {'colour': ['red', 'blue']}\n"
        "    body = {'image': image, 'categories': categories}\n"
        "    assert client.post('/sdapi/v1/interrogate/structured', json=body).status_code == 200\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("[]"), proc.stdout + proc.stderr
