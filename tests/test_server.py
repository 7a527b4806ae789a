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
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pi_axera_sd_service.service.engine import Engine

TXT2IMG = "/sdapi/v1/txt2img"


def txt2img(url: str, timeout: float = 60, **fields) -> httpx.Response:
    body = {"prompt": "a harbour at night", "steps": 4, "seed": 1, "cfg_scale": 1, **fields}
    return httpx.post(url + TXT2IMG, json=body, timeout=timeout)


def wait_for(condition, timeout: float = 10.0, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


def progress(url: str) -> dict:
    return httpx.get(url + "/sdapi/v1/progress", timeout=5).json()


def test_twenty_clients_with_max_queue_four(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory(delays={"unet": 0.03})
    server = live_server(settings_factory(max_queue=4), wrap)

    def call(i: int) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = txt2img(server.url, seed=i)
        return response, time.monotonic() - started

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(call, range(20)))
    ok = [(r, s) for r, s in outcomes if r.status_code == 200]
    refused = [(r, s) for r, s in outcomes if r.status_code == 503]
    assert len(ok) + len(refused) == 20, [r.status_code for r, _ in outcomes]
    assert 4 <= len(ok) < 20, "max_queue waiting (+ the running one) are accepted, not all 20"
    assert all(len(r.json()["images"]) == 1 for r, _ in ok)
    assert all(int(r.headers["Retry-After"]) >= 1 for r, _ in refused)
    assert all("max_queue" in r.json()["detail"] for r, _ in refused)
    assert max(s for _, s in refused) < min(s for _, s in ok)  # refused at once, not after a wait
    assert wrap.calls("text_encoder") == len(ok)  # every accepted job ran, no refused one did
    assert txt2img(server.url).status_code == 200  # the worker still serves


def test_progress_answers_fast_while_busy_and_idle_after(live_server, settings_factory, wrap_factory):
    server = live_server(settings_factory(), wrap_factory(delays={"unet": 0.15}))
    job = ThreadPoolExecutor(1).submit(txt2img, server.url, batch_size=2)
    wait_for(lambda: progress(server.url)["state"]["job"] != "")
    snapshots, latencies = [], []
    with httpx.Client(base_url=server.url, timeout=5) as http:  # one keep-alive connection
        http.get("/internal/ping")
        while not job.done():
            started = time.monotonic()
            snapshots.append(http.get("/sdapi/v1/progress").json())
            latencies.append(time.monotonic() - started)
            time.sleep(0.03)
    assert job.result().status_code == 200
    busy = [s for s in snapshots if s["state"]["job"]]
    assert max(latencies) < 0.1, f"slowest /progress {max(latencies):.3f} s"
    assert all(s["state"]["job_count"] == 2 and 0.01 <= s["progress"] <= 1 for s in busy)
    steps_seen = [(s["state"]["job_no"], s["state"]["sampling_step"]) for s in busy]
    assert steps_seen == sorted(steps_seen) and len(set(steps_seen)) >= 4  # advancing
    idle = progress(server.url)
    assert idle["progress"] == 0 and idle["state"]["job"] == "" and idle["state"]["job_count"] == 0
    assert "current_image" in idle and idle["current_image"] is None


def hold_unet_call(wrap, call: int) -> tuple[threading.Event, threading.Event]:
    """(entered, release): the UNet's run number `call` waits inside the step until `release` is set,
    so a test acts while a step is known to be running, whatever the machine's load."""
    session = wrap.sessions["unet"]
    run, runs = session.run, [0]
    entered, release = threading.Event(), threading.Event()

    def held_run(feed):
        runs[0] += 1
        if runs[0] == call:
            entered.set()
            release.wait(60)
        return run(feed)

    session.run = held_run
    return entered, release


def test_interrupt_returns_early_and_skip_moves_on(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory()
    server = live_server(settings_factory(), wrap)
    pool = ThreadPoolExecutor(1)

    entered, release = hold_unet_call(wrap, 2)
    job = pool.submit(txt2img, server.url, batch_size=3)
    assert entered.wait(60)
    assert httpx.post(server.url + "/sdapi/v1/interrupt", timeout=5).json() == {}
    release.set()
    interrupted = job.result()
    assert interrupted.status_code == 200 and len(interrupted.json()["images"]) == 1
    assert wrap.calls("unet") == 2  # stopped after the step that was running; 3 images x 4 steps not run

    unet_before = wrap.calls("unet")
    entered, release = hold_unet_call(wrap, 2)
    job = pool.submit(txt2img, server.url, batch_size=2)
    assert entered.wait(60)
    assert httpx.post(server.url + "/sdapi/v1/skip", timeout=5).json() is None
    release.set()
    skipped = job.result()
    assert skipped.status_code == 200 and len(skipped.json()["images"]) == 2
    assert wrap.calls("unet") - unet_before == 2 + 4  # the first image stopped early, the second ran


def test_disconnected_queued_client_never_runs(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory()
    server = live_server(settings_factory(), wrap)
    entered, release = hold_unet_call(wrap, 1)  # the first job runs until the queued one was dropped
    running = ThreadPoolExecutor(1).submit(txt2img, server.url)
    assert entered.wait(60)

    body = json.dumps({"prompt": "never run", "steps": 4}).encode()
    address = urlparse(server.url)
    with socket.create_connection((address.hostname, address.port)) as raw:
        head = f"POST {TXT2IMG} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        raw.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        wait_for(lambda: httpx.get(server.url + "/internal/pending-tasks", timeout=5).json()["size"] == 1,
                 timeout=60)
    wait_for(lambda: server.engine.jobs_dropped == 1, timeout=60)
    release.set()
    assert running.result().status_code == 200
    assert txt2img(server.url).status_code == 200
    assert wrap.calls("text_encoder") == 2  # the first job and the last one; the dropped one never ran


def test_per_task_progress_reports_queue_position(live_server, settings_factory, wrap_factory):
    wrap = wrap_factory()
    server = live_server(settings_factory(), wrap)
    pool = ThreadPoolExecutor(2)
    entered, release = hold_unet_call(wrap, 1)  # the first job runs until the checks are done
    first = pool.submit(txt2img, server.url, force_task_id="task(first)")
    assert entered.wait(60)
    second = pool.submit(txt2img, server.url, force_task_id="task(second)")
    pending = lambda: httpx.get(server.url + "/internal/pending-tasks", timeout=5).json()  # noqa: E731
    wait_for(lambda: pending()["size"] == 1, timeout=60)
    assert pending() == {"size": 1, "tasks": ["task(second)"]}

    def task(id_task: str) -> dict:
        return httpx.post(server.url + "/internal/progress", json={"id_task": id_task}, timeout=5).json()

    waiting, active = task("task(second)"), task("task(first)")
    assert waiting["queued"] and not waiting["active"] and waiting["queue_position"] == 0
    assert "In queue: 1/1" in waiting["textinfo"]
    assert active["active"] and 0 <= active["progress"] <= 1
    release.set()
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
            release.wait(10)
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
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
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
