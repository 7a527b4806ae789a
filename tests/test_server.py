"""The real server (uvicorn, ephemeral port, demo pack, delayed sessions) under concurrent clients."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
from conftest import HANG_S
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pi_axera_sd_service.service.engine import Engine

TXT2IMG = "/sdapi/v1/txt2img"


def txt2img(url: str, timeout: float = 60, **fields) -> httpx.Response:
    body = {"prompt": "a harbour at night", "steps": 4, "seed": 1, "cfg_scale": 1, **fields}
    return httpx.post(url + TXT2IMG, json=body, timeout=timeout)


def wait_for(condition, timeout: float = HANG_S, every: float = 0.01) -> None:
    """Poll until `condition()`; the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


def progress(url: str) -> dict:
    return httpx.get(url + "/sdapi/v1/progress", timeout=HANG_S).json()


def pending(url: str) -> dict:
    return httpx.get(url + "/internal/pending-tasks", timeout=HANG_S).json()


def test_twenty_clients_with_max_queue_four(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    server = live_server(settings_factory(max_queue=4), wrap)
    gate = wrap.gates["unet"]
    pool = ThreadPoolExecutor(20)
    first = pool.submit(txt2img, server.url, seed=0)
    gate.wait_held()  # the first job is running and stays so until the gate opens
    others = [pool.submit(txt2img, server.url, seed=i) for i in range(1, 20)]
    wait_for(lambda: sum(f.done() for f in others) == 15 and pending(server.url)["size"] == 4)
    refused = [f.result() for f in others if f.done()]  # answered while the running job is still held
    assert gate.held and not first.done()
    assert all(r.status_code == 503 for r in refused), [r.status_code for r in refused]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert all("max_queue" in r.json()["detail"] for r in refused)
    gate.open()
    ok = [first.result()] + [f.result() for f in others if f.result() not in refused]
    assert [r.status_code for r in ok] == [200] * 5  # the running one + max_queue waiting
    assert all(len(r.json()["images"]) == 1 for r in ok)
    assert wrap.calls("text_encoder") == 5  # every accepted job ran, no refused one did
    assert txt2img(server.url).status_code == 200  # the worker still serves


def test_progress_answers_while_a_job_runs_and_idle_after(live_server, settings_factory, wrap_factory):
    """/progress is answered while the NPU is provably busy (a UNet call held), and advances step by step."""
    wrap = wrap_factory(gated=("unet",))
    server = live_server(settings_factory(), wrap)
    gate = wrap.gates["unet"]
    job = ThreadPoolExecutor(1).submit(txt2img, server.url, batch_size=2)
    snapshots = []
    with httpx.Client(base_url=server.url, timeout=HANG_S) as http:  # one keep-alive connection
        for call in range(8):  # 2 images x 4 steps, one UNet pass each (cfg_scale 1)
            gate.wait_held(passed=call)
            snapshots.append(http.get("/sdapi/v1/progress").json())
            assert gate.held and not job.done()  # answered while the job waits on the NPU
            gate.allow()
    assert job.result().status_code == 200
    assert all(s["state"]["job"] and s["state"]["job_count"] == 2 for s in snapshots)
    assert all(0.01 <= s["progress"] <= 1 for s in snapshots)
    steps_seen = [(s["state"]["job_no"], s["state"]["sampling_step"]) for s in snapshots]
    assert steps_seen == sorted(steps_seen) and len(set(steps_seen)) >= 6  # advancing with the steps
    assert {job_no for job_no, _ in steps_seen} == {0, 1}
    idle = progress(server.url)
    assert idle["progress"] == 0 and idle["state"]["job"] == "" and idle["state"]["job_count"] == 0
    assert "current_image" in idle and idle["current_image"] is None


def test_interrupt_returns_early_and_skip_moves_on(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    server = live_server(settings_factory(), wrap)
    gate = wrap.gates["unet"]
    pool = ThreadPoolExecutor(1)

    job = pool.submit(txt2img, server.url, batch_size=3)
    gate.allow()
    gate.wait_held(passed=1)  # step 1 of image 1 done, step 2 waits
    assert httpx.post(server.url + "/sdapi/v1/interrupt", timeout=HANG_S).json() == {}
    gate.open()
    interrupted = job.result()
    assert interrupted.status_code == 200 and len(interrupted.json()["images"]) == 1
    assert wrap.calls("unet") == 2  # stopped after the step that was running; 3 images x 4 steps not run

    gate.close()
    unet_before = wrap.calls("unet")
    job = pool.submit(txt2img, server.url, batch_size=2)
    gate.allow()
    gate.wait_held(passed=unet_before + 1)  # image 1 is mid-sampling
    assert httpx.post(server.url + "/sdapi/v1/skip", timeout=HANG_S).json() is None
    gate.open()
    skipped = job.result()
    assert skipped.status_code == 200 and len(skipped.json()["images"]) == 2
    assert wrap.calls("unet") - unet_before == 2 + 4  # the first image stopped early, the second ran


def test_disconnected_queued_client_never_runs(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    server = live_server(settings_factory(), wrap)
    running = ThreadPoolExecutor(1).submit(txt2img, server.url)
    wrap.gates["unet"].wait_held()  # the first job runs until the queued client has gone

    body = json.dumps({"prompt": "never run", "steps": 4}).encode()
    address = urlparse(server.url)
    with socket.create_connection((address.hostname, address.port)) as raw:
        head = f"POST {TXT2IMG} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        raw.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        wait_for(lambda: pending(server.url)["size"] == 1)
    wait_for(lambda: server.engine.jobs_dropped == 1)
    assert pending(server.url)["size"] == 0 and wrap.gates["unet"].held  # dropped while still queued
    wrap.gates["unet"].open()
    assert running.result().status_code == 200
    assert txt2img(server.url).status_code == 200
    assert wrap.calls("text_encoder") == 2  # the first job and the last one; the dropped one never ran


def test_per_task_progress_reports_queue_position(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    server = live_server(settings_factory(), wrap)
    pool = ThreadPoolExecutor(2)
    first = pool.submit(txt2img, server.url, force_task_id="task(first)")
    wrap.gates["unet"].wait_held()  # the first job is running
    second = pool.submit(txt2img, server.url, force_task_id="task(second)")
    wait_for(lambda: pending(server.url)["size"] == 1)
    assert pending(server.url) == {"size": 1, "tasks": ["task(second)"]}

    def task(id_task: str) -> dict:
        return httpx.post(server.url + "/internal/progress", json={"id_task": id_task}, timeout=HANG_S).json()

    waiting, active = task("task(second)"), task("task(first)")
    assert waiting["queued"] and not waiting["active"] and waiting["queue_position"] == 0
    assert "In queue: 1/1" in waiting["textinfo"]
    assert active["active"] and 0 <= active["progress"] <= 1
    wrap.open_gates()
    assert first.result().status_code == 200 and second.result().status_code == 200
    assert task("task(second)")["completed"]


def test_failing_session_fails_one_job_with_stage_named(live_server, settings_factory, wrap_factory):
    server = live_server(settings_factory(), wrap_factory(fail_calls={"unet": {3}}))
    failed = txt2img(server.url)
    assert failed.status_code == 500
    body = failed.json()
    assert body["error"] == "StageError" and "unet" in body["detail"]
    assert "simulated runtime failure" in body["detail"] and "Traceback" not in failed.text
    assert txt2img(server.url).status_code == 200
    assert httpx.get(server.url + "/health", timeout=5).json()["status"] == "ok"


def test_metrics_parse_and_count_the_requests(live_server, settings_factory):
    server = live_server(settings_factory())
    assert txt2img(server.url, batch_size=2).status_code == 200
    assert txt2img(server.url).status_code == 200
    assert txt2img(server.url, steps="many").status_code == 422
    for _ in range(3):
        assert httpx.get(server.url + "/sdapi/v1/progress", timeout=5).status_code == 200
    assert httpx.get(server.url + "/no/such/route", timeout=5).status_code == 404
    text = httpx.get(server.url + "/metrics", timeout=5).text

    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = {(s.labels["route"], s.labels["method"], s.labels["status"]): s.value
                for s in families["sd_http_requests"].samples if s.name == "sd_http_requests_total"}
    assert requests == {(TXT2IMG, "POST", "200"): 2, (TXT2IMG, "POST", "422"): 1,
                        ("/sdapi/v1/progress", "GET", "200"): 3, ("unmatched", "GET", "404"): 1}
    images = [s.value for s in families["sd_images_generated"].samples if s.name.endswith("_total")]
    assert images == [3]
    latency = {s.name: s.value for s in families["sd_generation_seconds"].samples}
    assert latency["sd_generation_seconds_count"] == 2
    stages = {s.labels["stage"] for s in families["sd_npu_stage_seconds"].samples}
    assert {"text", "unet", "vae_decode"} <= stages
    depth = [s.value for s in families["sd_queue_depth"].samples]
    assert depth == [0]


def test_health_shape(live_server, settings_factory):
    server = live_server(settings_factory())
    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["backend"] == "onnxruntime" and body["queue_depth"] == 0
    assert body["busy"] is False and body["uptime_s"] >= 0 and body["model"]
    assert httpx.get(server.url + "/internal/ping", timeout=5).json() == {}
    assert "X-Request-Id" in health.headers
    echoed = httpx.get(server.url + "/internal/ping", headers={"X-Request-Id": "abc-123"}, timeout=5)
    assert echoed.headers["X-Request-Id"] == "abc-123"


def test_capabilities_route(live_server, settings_factory):
    server = live_server(settings_factory())
    body = httpx.get(server.url + "/capabilities", timeout=5).json()
    assert isinstance(body, dict) and body



def test_one_structured_log_line_per_request(make_client, settings_factory, caplog):
    client = make_client(settings_factory(log_json=True))
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()
    with caplog.at_level(logging.INFO, logger="pi_axera_sd_service.access"):
        response = client.post("/sdapi/v1/img2img", headers={"X-Request-Id": "req-42"},
                               json={"prompt": "a boat", "steps": 2, "init_images": [init], "cfg_scale": 1})
    assert response.status_code == 200 and response.headers["X-Request-Id"] == "req-42"
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pi_axera_sd_service.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "req-42" and line["route"] == "/sdapi/v1/img2img" and line["status"] == 200
    assert line["params"]["init_images"] == [f"<base64: {len(init)} chars>"]
    assert line["params"]["prompt"] == "a boat" and init not in json.dumps(line)
    assert {"text", "unet", "vae_encode", "vae_decode"} <= set(line["stage_ms"])
    assert line["task_id"].startswith("task(img2img-") and isinstance(line["warnings"], list)


def test_health_is_503_until_the_engine_started(demo_models, settings_factory):
    engine = Engine(settings_factory(), models=demo_models)
    assert engine.health()["status"] == "starting"
    engine.start()
    assert engine.health()["status"] == "ok"
    engine.shutdown(5)
    assert engine.health()["status"] == "shutting_down"


def loading_client(demo_models, settings):
    """(a TestClient whose engine loads in the background until `release` is set, release)."""
    from fastapi.testclient import TestClient

    from pi_axera_sd_service.api.app import create_app

    release = threading.Event()

    class SlowLoadingEngine(Engine):
        def start(self) -> None:
            release.wait(HANG_S)
            super().start()

    engine = SlowLoadingEngine(settings, models=demo_models)
    return TestClient(create_app(settings, engine, load_in_background=True)), release


def test_server_answers_while_models_load_in_the_background(demo_models, settings_factory):
    """While the models load (≈15 s on the NPU) health is 503 "starting"; progress answers at once.
    (Generation requests wait for the load: tests/test_hardening_service.py.)"""
    client, release = loading_client(demo_models, settings_factory())
    with client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
        release.set()
        wait_for(lambda: client.get("/health").status_code == 200)
        done = client.post("/generate", json={"mode": "txt2img", "prompt": "a fox", "seed": 1})
        assert done.status_code == 200 and done.json()["status"] == "ok"


def test_log_redaction_covers_image_fields_of_any_length_and_nested_values():
    from pi_axera_sd_service.api.middleware import redact

    short = base64.b64encode(b"\x89PNG tiny image bytes").decode()
    params = {
        "prompt": "a cat", "mask": short, "init_images": [short, "data:image/png;base64," + short],
        "alwayson_scripts": {"ControlNet": {"args": [{"image": "data:image/jpeg;base64,/9j/4AAQ",
                                                      "weight": 1.0, "module": "canny"}]}},
        "override_settings": {"sd_vae": "Automatic", "img": "data:image/webp;base64,UklGRg=="},
    }
    logged = json.dumps(redact(params))
    assert short not in logged and "/9j/4AAQ" not in logged and "UklGRg" not in logged
    assert redact(params)["prompt"] == "a cat"
    assert redact(params)["alwayson_scripts"]["ControlNet"]["args"][0]["module"] == "canny"
    assert redact(params)["override_settings"]["sd_vae"] == "Automatic"
    assert redact(params)["mask"] == f"<base64: {len(short)} chars>"


def test_every_route_gives_the_one_not_ready_answer_while_loading(demo_models, settings_factory):
    """Options and /capabilities answer the same 503 + Retry-After at once (generation waits instead)."""
    client, release = loading_client(demo_models, settings_factory())
    with client:
        answers = {
            "options": client.get("/sdapi/v1/options"),
            "set options": client.post("/sdapi/v1/options", json={"jpeg_quality": 90}),
            "capabilities": client.get("/capabilities"),
        }
        release.set()
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert {name: (r.status_code, r.headers.get("Retry-After")) for name, r in answers.items()} == {
        name: (503, "5") for name in answers
    }
    for name in ("options", "set options", "capabilities"):
        body = answers[name].json()
        assert (body["error"], body["detail"]) == ("NotReadyError", "Models are still loading"), name
