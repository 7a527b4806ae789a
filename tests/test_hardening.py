"""Issue 13, one table per class of bad input: every one a JSON 4xx naming the field, before any work.

Class numbers follow the issue: 1 numbers, 2 free-form fields, 3 prompts, 4 bodies, 5 image memory,
6 metrics labels, 8 slow clients (real server, raw sockets), 11 exit codes. Property-based tests
(hypothesis, bounded) run over the parsers and models these tables sample.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from pi_axera_sd_service.api.app import create_app
from pi_axera_sd_service.api.body import BodyError, check_json_value, parse_json_body
from pi_axera_sd_service.api.protocol import GenerateRequest, Img2ImgRequest, Txt2ImgRequest
from pi_axera_sd_service.api.server import server_config
from pi_axera_sd_service.pipeline.images import ImageDecodeError, decode_image_bytes
from pi_axera_sd_service.pipeline.prompt_parser import PromptError, parse_prompt_attention, prompt_schedule
from pi_axera_sd_service.service.engine import Engine
from pi_axera_sd_service.service.metrics import KNOWN_METHODS, OTHER_METHOD

ROUTES = ["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/generate"]


def init_image_b64(size: tuple[int, int] = (64, 48)) -> str:
    import base64

    buf = io.BytesIO()
    Image.new("RGB", size, "teal").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def body_for(route: str, **raw_fields: str) -> str:
    """A JSON body for `route` (valid apart from `raw_fields`, given as raw JSON text)."""
    base = {"prompt": json.dumps("a lighthouse"), "steps": "1", "cfg_scale": "1"}
    if route == "/generate":
        base["mode"] = json.dumps("img2img" if "init_images" in raw_fields else "txt2img")
    if route.endswith("img2img"):
        base["init_images"] = json.dumps([init_image_b64()])
    base.update(raw_fields)
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in base.items()) + "}"


def post_raw(client, route: str, body: str | bytes):
    return client.post(route, content=body, headers={"Content-Type": "application/json"})


def error_text(response) -> str:
    """The message of either error shape (A1111's `detail`, /generate's `error`, FastAPI's 422 list)."""
    body = response.json()
    assert isinstance(body, dict)
    if response.request.url.path == "/generate":
        assert body["status"] == "error"
        return body["error"]
    return json.dumps(body["detail"])


@pytest.fixture()
def counted_client(make_client, settings_factory, wrap_factory):
    """(client, wrap): wrap counts the NPU calls, so a test can show a refusal did no work."""
    wrap = wrap_factory()
    return make_client(settings_factory(), wrap), wrap


# --- class 1: numbers ---------------------------------------------------------------------------------
HUGE = "1" + "0" * 400
NUMBER_FIELDS = ["width", "height", "steps", "batch_size", "n_iter", "resize_mode", "clip_skip",
                 "seed_resize_from_h", "seed_resize_from_w", "cfg_scale", "denoising_strength", "seed",
                 "subseed", "subseed_strength", "eta", "mask_blur", "hr_scale"]
HUGE_NUMBERS = [HUGE, "-" + HUGE, "1e400", "-1e400", "1" + "0" * 5000]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("value", HUGE_NUMBERS, ids=["400 digits", "-400 digits", "1e400", "-1e400",
                                                     "5000 digits"])
def test_numbers_out_of_range_are_a_4xx_naming_the_field(counted_client, route: str, value: str) -> None:
    client, wrap = counted_client
    for field in NUMBER_FIELDS:
        response = post_raw(client, route, body_for(route, **{field: value}))
        assert 400 <= response.status_code < 500, (field, response.text[:300])
        assert field in error_text(response), (field, response.text[:300])
    assert wrap.calls("text_encoder") == 0


@pytest.mark.parametrize("route", ROUTES[:2])
@pytest.mark.parametrize("field,value", [("steps", "3000000000"), ("width", "-3000000000"),
                                         ("cfg_scale", "1e300"), ("denoising_strength", "-1e300")])
def test_numbers_beyond_any_field_range_are_refused_by_the_model(counted_client, route, field, value) -> None:
    """Inside 2^64 (the body parser lets them through) but beyond the protocol's bounds: 422 naming it."""
    client, wrap = counted_client
    response = post_raw(client, route, body_for(route, **{field: value}))
    assert response.status_code == 422 and field in error_text(response), response.text[:300]
    assert wrap.calls("text_encoder") == 0


@pytest.mark.parametrize("value", [HUGE, "1e400", "NaN", "Infinity"])
def test_override_settings_and_option_values_out_of_range_are_a_4xx(counted_client, value: str) -> None:
    client, wrap = counted_client
    overrides = f'{{"CLIP_stop_at_last_layers": {value}}}'
    route = "/sdapi/v1/txt2img"
    response = post_raw(client, route, body_for(route, override_settings=overrides))
    assert response.status_code == 400
    assert "override_settings.CLIP_stop_at_last_layers" in error_text(response)
    response = post_raw(client, "/sdapi/v1/options", f'{{"jpeg_quality": {value}}}')
    assert response.status_code == 400 and "jpeg_quality" in error_text(response)
    assert wrap.calls("text_encoder") == 0


# --- class 2: free-form fields -------------------------------------------------------------------------
DEEP_80 = "[" * 80 + "]" * 80
FREE_FORM = [("script_args", "[NaN]"), ("script_args", f"[{DEEP_80}]"), ("comments", '{"a": Infinity}'),
             ("comments", f'{{"a": {DEEP_80}}}'),
             ("override_settings", '{"eta_noise_seed_delta": -Infinity}'),
             ("alwayson_scripts", '{"x": {"args": [NaN]}}'), ("alwayson_scripts", f'{{"x": {DEEP_80}}}')]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field,value", FREE_FORM)
def test_free_form_fields_are_checked_before_the_job_is_queued(counted_client, route, field, value) -> None:
    client, wrap = counted_client
    response = post_raw(client, route, body_for(route, **{field: value}))
    assert response.status_code == 400 and field in error_text(response), response.text[:300]
    assert wrap.calls("text_encoder") == 0  # refused up front: nothing computed, nothing lost


def test_free_form_fields_within_limits_still_run(app_client) -> None:
    body = body_for("/sdapi/v1/txt2img", script_args='[1, "x", {"a": [1.5, null]}]',
                    comments='{"note": "ok", "n": [1, 2.5, {"deep": [[[true]]]}]}')
    response = post_raw(app_client, "/sdapi/v1/txt2img", body)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["parameters"]["script_args"] == [1, "x", {"a": [1.5, None]}]


# --- class 3: prompts ----------------------------------------------------------------------------------
PROMPTS = [("(" * 500 + "x", "nested"), ("[" * 500 + "x" + "]" * 500, "nested"),
           ("[a:" * 300 + "b" + ":0.5]" * 300, "nested"), ("a \ud800 b", "Unicode"), ("\udfff", "Unicode")]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text,reason", PROMPTS,
                         ids=["500 (", "500 [ ]", "300 edits", "lone D800", "lone DFFF"])
def test_bad_prompts_are_a_4xx_naming_the_field(counted_client, route, field, text, reason) -> None:
    client, wrap = counted_client
    response = post_raw(client, route, body_for(route, **{field: json.dumps(text)}))
    assert 400 <= response.status_code < 500, response.text[:300]
    message = error_text(response)
    assert field in message and reason in message, message
    assert wrap.calls("text_encoder") == 0


def test_a_bad_prompt_filled_in_from_infotext_is_a_400_too(counted_client) -> None:
    """The infotext field sets the prompt after the model's checks: the pipeline's gate answers."""
    client, wrap = counted_client
    response = client.post("/sdapi/v1/txt2img", json={"infotext": "(" * 500 + "x\nSteps: 1, CFG scale: 1"})
    assert response.status_code == 400, response.text[:300]
    assert "prompt" in error_text(response) and "nested 500 deep" in error_text(response)
    assert wrap.calls("text_encoder") == 0


def test_nesting_at_the_limit_still_generates(app_client) -> None:
    from pi_axera_sd_service.pipeline.prompt_parser import MAX_PROMPT_NESTING

    prompt = "(" * MAX_PROMPT_NESTING + "x" + ")" * MAX_PROMPT_NESTING
    response = app_client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 1, "cfg_scale": 1})
    assert response.status_code == 200, response.text[:300]


# --- class 4: bodies -----------------------------------------------------------------------------------
BODY_ROUTES = [*ROUTES, "/sdapi/v1/options", "/sdapi/v1/png-info", "/sdapi/v1/interrupt"]
BAD_BODIES = {"1,000 deep": "[" * 1000 + "]" * 1000, "100,000 deep": "{\"a\": " * 100_000,
              "5,000 digits": '{"steps": ' + "9" * 5000 + "}", "not JSON": "{steps: 1}",
              "not UTF-8": b'{"prompt": "\xff\xfe"}', "200,000 values": "[" + "0," * 200_000 + "0]"}


@pytest.mark.parametrize("route", BODY_ROUTES)
@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_every_route_answers_a_bad_body_with_a_400_in_its_shape(app_client, caplog, route, name) -> None:
    caplog.set_level(logging.INFO, logger="pi_axera_sd_service.access")
    response = post_raw(app_client, route, BAD_BODIES[name])
    assert response.status_code == 400, response.text[:300]
    body = response.json()
    if route == "/generate":
        assert body["status"] == "error" and body["error"]
    else:
        assert set(body) == {"error", "detail", "body", "errors"} and body["detail"]
    lines = [r.getMessage() for r in caplog.records if r.name == "pi_axera_sd_service.access"]
    assert any("status=400" in line for line in lines), lines  # the access line is kept
    assert not any("Exception" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("route", ["/generate", "/sdapi/v1/txt2img"])
def test_oversize_bodies_are_refused_in_the_route_family_shape(make_client, settings_factory, route) -> None:
    client = make_client(settings_factory(max_body_bytes=1000))
    response = client.post(route, json={"mode": "txt2img", "prompt": "x" * 2000})
    assert response.status_code == 413
    message = error_text(response)
    assert "max_body_bytes" in message


def test_access_log_line_survives_a_body_it_cannot_show(app_client, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pi_axera_sd_service.access")
    response = app_client.post("/sdapi/v1/interrupt", content=b"\x00\xff" * 10,
                               headers={"Content-Type": "application/octet-stream"})
    assert response.status_code < 500
    assert any("route=/sdapi/v1/interrupt" in r.getMessage() for r in caplog.records)


# --- class 5: image memory (pipeline decode API) -------------------------------------------------------
def _jpeg_claiming(width: int, height: int) -> bytes:
    """A few-KiB JPEG whose frame header claims width x height (the scan data is a 64x64 image's)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="JPEG", quality=50)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_small_jpeg_claiming_6000x6000_is_never_decoded_at_full_size() -> None:
    """Measured in a fresh process: full size would add 108 MB of RSS; the draft decode stays small."""
    code = (
        "import resource, sys\n"
        "from pi_axera_sd_service.pipeline.images import decode_image_bytes, ImageDecodeError\n"
        "raw = sys.stdin.buffer.read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    print(decode_image_bytes(raw, 40_000_000, (512, 512)).size)\n"
        "except ImageDecodeError as exc:\n    print('refused', exc)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    raw = _jpeg_claiming(6000, 6000)
    assert len(raw) < 4096
    proc = subprocess.run([sys.executable, "-c", code], input=raw, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    outcome, grown_mb = proc.stdout.decode().splitlines()
    assert "6000" not in outcome.split("refused")[0], outcome
    assert int(grown_mb) < 40, f"decoding grew RSS by {grown_mb} MB"


def test_jpeg_is_decoded_at_the_smallest_scale_covering_the_target() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4096, 2048), "navy").save(buf, format="JPEG")
    assert decode_image_bytes(buf.getvalue(), 40_000_000, (512, 512)).size == (1024, 512)
    assert decode_image_bytes(buf.getvalue(), 40_000_000).size == (4096, 2048)  # no target: full size


def test_pixel_budget_caps_the_request_not_just_each_image() -> None:
    from pi_axera_sd_service.pipeline.images import PixelBudget, decode_image_b64

    budget = PixelBudget(3 * 64 * 48)
    for _ in range(3):
        decode_image_b64(init_image_b64(), 40_000_000, budget=budget)
    with pytest.raises(ImageDecodeError, match="max_request_pixels"):
        decode_image_b64(init_image_b64(), 40_000_000, budget=budget)


@pytest.mark.parametrize("sent,batch,used", [(500, 1, 1), (500, 8, 8), (3, 8, 3), (1, 4, 1), (0, 2, 0)])
def test_only_the_init_images_a_batch_reads_are_decoded(sent: int, batch: int, used: int) -> None:
    from pi_axera_sd_service.pipeline.images import images_used

    assert images_used(sent, batch) == used


# --- class 6: metrics labels ---------------------------------------------------------------------------
def test_unknown_methods_and_paths_never_become_label_values(make_client, settings_factory) -> None:
    client = make_client(settings_factory(api_auth="alice:pw"))
    for i in range(30):
        client.request(f"BREW{i}", f"/random/{i}")
        client.request(f"X{i}", "/sdapi/v1/txt2img")
    client.request("GET", "/metrics/../../etc")
    families = text_string_to_metric_families(
        client.get("/metrics", auth=("alice", "pw")).text)
    labels = {(s.labels["method"], s.labels["route"]) for f in families if f.name == "sd_http_requests"
              for s in f.samples}
    methods = {m for m, _ in labels}
    assert methods <= KNOWN_METHODS | {OTHER_METHOD} and OTHER_METHOD in methods
    assert {r for _, r in labels} <= {"unmatched", "/sdapi/v1/txt2img", "/metrics"}


# --- class 8: slow and stuck clients (a real server on 127.0.0.1) --------------------------------------
class RealServer:
    """uvicorn with the service's own configuration (server_config) on an ephemeral port."""

    def __init__(self, settings, demo_models):
        app = create_app(settings, Engine(settings, models=demo_models))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(server_config(settings, app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=60)

    def get(self, path: str, timeout: float = 60) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as conn:
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            reply = read_until_closed(conn)
        return int(reply.split(b" ", 2)[1]), reply

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def read_until_closed(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket timeout: 60 s)."""
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture()
def real_server(demo_models, settings_factory) -> Iterator:
    servers: list[RealServer] = []

    def start(**overrides) -> RealServer:
        servers.append(RealServer(settings_factory(**overrides), demo_models))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _stuck_clients(server: RealServer, count: int) -> list[socket.socket]:
    """Half send an unfinished head, half a head promising 1,000 body bytes and then 10."""
    clients = []
    for i in range(count):
        conn = server.connect()
        if i % 2:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        else:
            conn.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        clients.append(conn)
    return clients


def test_health_answers_while_hundreds_of_clients_hang(real_server) -> None:
    server = real_server(header_timeout=300, body_timeout=300)
    clients = _stuck_clients(server, 300)
    try:
        status, reply = server.get("/health")
        assert status == 200 and b'"status"' in reply, reply[:300]  # the app's own answer
        status, _ = server.get("/sdapi/v1/progress")
        assert status == 200
    finally:
        for conn in clients:
            conn.close()


def test_idle_slow_header_and_slow_body_clients_are_cut_off(real_server) -> None:
    server = real_server(header_timeout=0.5, body_timeout=0.5, keep_alive_timeout=0.5)
    idle = server.connect()
    slow_head, slow_body = _stuck_clients(server, 2)[::-1]
    assert read_until_closed(idle) == b""        # never sent anything: closed
    assert read_until_closed(slow_head) == b""   # never finished its headers: closed
    reply = read_until_closed(slow_body)         # never finished its body: 408 in /generate's shape
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["status"] == "error"
    oversize = server.connect()  # declares more than max_body_bytes, then trickles: 413, closed
    oversize.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n{")
    assert read_until_closed(oversize).startswith(b"HTTP/1.1 413")
    keep_alive = server.connect()
    keep_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"HTTP/1.1" in read_until_closed(keep_alive)  # answered, then closed once idle


def test_connections_beyond_the_bound_are_refused_not_queued(real_server) -> None:
    server = real_server(max_connections=20, header_timeout=300)
    clients = [server.connect() for _ in range(25)]
    try:
        status, reply = server.get("/health")
        assert status == 503, reply[:200]
    finally:
        for conn in clients:
            conn.close()


# --- class 11: exit codes ------------------------------------------------------------------------------
def test_missing_models_exit_with_a_configuration_code_that_systemd_does_not_restart(tmp_path) -> None:
    from pi_axera_sd_service.deploy import render_unit
    from pi_axera_sd_service.exit_codes import CONFIG_EXIT_CODES, EXIT_MODEL_LOAD

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pi_axera_sd_service", "serve", "--unet-model", str(tmp_path / "missing.onnx"),
         "--port", str(port), "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == EXIT_MODEL_LOAD, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]  # the reason, last in the journal
    assert f"exit code {EXIT_MODEL_LOAD}" in last_line and "not found" in last_line, last_line
    unit = render_unit(tmp_path / "venv", "pi", tmp_path, tmp_path / "env", tmp_path / "out", tmp_path / "st")
    prevent = [line for line in unit.splitlines() if line.startswith("RestartPreventExitStatus=")]
    assert prevent == ["RestartPreventExitStatus=" + " ".join(map(str, CONFIG_EXIT_CODES))]
    assert EXIT_MODEL_LOAD in CONFIG_EXIT_CODES


def test_configuration_errors_exit_3_runtime_errors_exit_1() -> None:
    from pi_axera_sd_service.cli import run_reporting_errors
    from pi_axera_sd_service.exit_codes import EXIT_CONFIG, EXIT_FAILURE
    from pi_axera_sd_service.oneshot import CliError
    from pi_axera_sd_service.pipeline.stages import StageError

    def config_error() -> int:
        raise CliError("MODEL_DIR /nowhere does not exist")

    def runtime_error() -> int:
        raise StageError("unet", "device lost")

    assert run_reporting_errors(config_error) == EXIT_CONFIG
    assert run_reporting_errors(runtime_error) == EXIT_FAILURE


# --- property-based: the parsers and models above, on inputs nobody wrote down (bounded in time) -------
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROMPT_ALPHABET = st.sampled_from(list("ab ()[]:|\\,.0123456789e-+") + ["AND", "BREAK", "\ud800", "é"])
prompt_texts = st.lists(PROMPT_ALPHABET, max_size=400).map("".join) | st.text(max_size=200)
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)


@BOUNDED
@given(text=prompt_texts, steps=st.integers(min_value=1, max_value=8))
def test_prompt_parser_answers_or_refuses_cleanly(text: str, steps: int) -> None:
    """Any text: a schedule ending at `steps`, or a PromptError naming the field; nothing else."""
    try:
        schedule = prompt_schedule(text, steps, field="negative_prompt")
    except PromptError as exc:
        assert exc.field == "negative_prompt"
        return
    assert schedule[-1][0] == steps and all(1 <= end <= steps for end, _ in schedule)
    assert all(isinstance(weight, float) for _, weight in parse_prompt_attention(text))


@BOUNDED
@given(depth=st.integers(min_value=0, max_value=3000), opener=st.sampled_from(["(", "["]))
def test_prompt_nesting_never_exhausts_the_stack(depth: int, opener: str) -> None:
    closer = {"(": ")", "[": "]"}[opener]
    for text in (opener * depth + "x", opener * depth + "x" + closer * depth):
        try:
            prompt_schedule(text, 4)
        except PromptError as exc:
            assert "nested" in exc.message


@BOUNDED
@given(value=json_values)
def test_body_parser_accepts_exactly_what_the_checks_accept(value) -> None:
    """Serialized and parsed again: the same value, or a BodyError naming where; never another error."""
    raw = json.dumps(value).encode("utf-8", "surrogatepass")
    try:
        parsed = parse_json_body(raw)
    except BodyError:
        with pytest.raises(BodyError):
            check_json_value(value)
        return
    assert json.dumps(parsed, allow_nan=False) == json.dumps(value)


@BOUNDED
@given(raw=st.binary(max_size=300) | st.builds(lambda depth: b"[" * depth, st.integers(0, 5000)))
def test_body_parser_never_raises_anything_but_body_error(raw: bytes) -> None:
    with contextlib.suppress(BodyError):
        parse_json_body(raw)


FIELDS = sorted(set(Txt2ImgRequest.model_fields) | set(Img2ImgRequest.model_fields)
                | set(GenerateRequest.model_fields))


@BOUNDED
@given(body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6))
def test_models_accept_only_what_serializes_and_stays_in_range(body: dict) -> None:
    """Whatever a model accepts dumps to strict JSON (no NaN, no overflowing ints): the answer cannot fail."""
    for model in (Txt2ImgRequest, Img2ImgRequest, GenerateRequest):
        try:
            dumped = model.model_validate(body).model_dump()
        except ValidationError:
            continue
        json.dumps(dumped, allow_nan=False)
        for name, value in dumped.items():
            if isinstance(value, int) and not isinstance(value, bool) and name not in ("seed", "subseed"):
                assert abs(value) < 2**31, name


@BOUNDED
@given(raw=st.binary(max_size=400), keep=st.integers(min_value=0, max_value=2000))
def test_image_decode_answers_or_refuses_cleanly(raw: bytes, keep: int) -> None:
    """Random bytes and truncated real images: an RGB image or an ImageDecodeError, nothing else."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "olive").save(buf, format="JPEG")
    for data in (raw, buf.getvalue()[:keep], _jpeg_claiming(60000, 60000)):
        with contextlib.suppress(ImageDecodeError):
            assert decode_image_bytes(data, 40_000_000, (512, 512)).mode == "RGB"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4))
def test_routes_answer_any_json_object_without_a_server_error(app_client, route: str, body: dict) -> None:
    """Any JSON object (non-finite numbers included) on a generation route: never a 5xx, always JSON."""
    raw = json.dumps({"prompt": "p", "steps": 1, "cfg_scale": 1, **body}).encode("utf-8", "surrogatepass")
    response = post_raw(app_client, route, raw)
    assert response.status_code < 500, response.text[:300]
    assert isinstance(response.json(), dict)
