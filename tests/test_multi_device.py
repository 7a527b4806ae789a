"""Several devices in one process (onnxruntime: one CPU session set per device): the plan's images
are spread over the devices and reassembled in order, a lost device takes out only its own worker,
a device that fails to load starts the service degraded, /health and /metrics show each device.

Causality comes from gates in the wrapped sessions (events), never from timing margins.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pytest
from pydantic import ValidationError

from pi_axera_sd_service.pipeline.stages import StageError
from pi_axera_sd_service.runtime.session import ModelLoadError, Session
from pi_axera_sd_service.service import engine as engine_module
from pi_axera_sd_service.service.engine import Engine, check_device_indexes, current_device
from pi_axera_sd_service.service.request import GenerationRequest
from pi_axera_sd_service.settings import Settings

GATE_TIMEOUT_S = 60.0          # only a hang guard: every gate opens by causality
DEVICE_GONE = "axclrtEngineExecute failed, ret 0x8030000b"

Hook = Callable[[int, str, int], None]   # (device, role, call number on that device and role)


class DeviceSession:
    """A Session of one device: counts calls and runs the test's hook before each."""

    def __init__(self, owner: PerDevice, device: int, role: str, inner: Session):
        self.owner, self.device, self.role, self.inner = owner, device, role, inner
        self.path, self.backend = inner.path, inner.backend
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        call = self.owner.count(self.device, self.role)
        if self.owner.hook is not None:
            self.owner.hook(self.device, self.role, call)
        return self.inner.run(feed)


class PerDevice:
    """wrap(role, session) for Engine: called on each device's worker thread (current_device())."""

    def __init__(self, hook: Hook | None = None, fail_load: tuple[int, ...] = ()):
        self.hook = hook
        self.fail_load = fail_load
        self.calls: dict[tuple[int, str], int] = defaultdict(int)
        self.wrapped_on: list[int | None] = []
        self._lock = threading.Lock()

    def __call__(self, role: str, session: Session) -> Session:
        device = current_device()
        self.wrapped_on.append(device)
        if device in self.fail_load:
            raise ModelLoadError(f"simulated: card {device} does not answer")
        assert device is not None
        return DeviceSession(self, device, role, session)

    def count(self, device: int, role: str) -> int:
        with self._lock:
            self.calls[device, role] += 1
            return self.calls[device, role]


@pytest.fixture()
def engines(demo_models) -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(settings: Settings, wrap=None) -> Engine:
        engine = Engine(settings, models=demo_models, wrap=wrap)
        made.append(engine)
        engine.start()
        return engine

    yield make
    for engine in made:
        engine.shutdown(5)


def batch(engine: Engine, images: int, seed: int = 11, **fields) -> GenerationRequest:
    return GenerationRequest(prompt="a lighthouse at dusk", negative_prompt="fog", seed=seed,
                             batch_size=images, **fields)


def run(engine: Engine, request: GenerationRequest):
    return asyncio.run(engine.submit(engine.plan(request)))


def pixels(result) -> list[bytes]:
    return [image.tobytes() for image in result.images]


def both_devices_gate() -> tuple[Hook, threading.Event]:
    """A hook holding each device's first UNet call until the other device has made one too."""
    entered = {0: threading.Event(), 1: threading.Event()}
    released = threading.Event()

    def hook(device: int, role: str, call: int) -> None:
        if role == "unet" and call == 1:
            entered[device].set()
            assert entered[1 - device].wait(GATE_TIMEOUT_S), f"device {1 - device} never ran"
            released.set()

    return hook, released


def test_device_list_settings():
    assert Settings(device_id=0).devices == (0,)
    assert Settings(device_id="0,1").devices == (0, 1) and Settings(device_id="0,1").device_id == 0
    assert Settings(device_ids=" 1, 0 ").devices == (1, 0)
    for bad in ("0,0", "0,-1", "a,b"):
        with pytest.raises(ValidationError, match="device_ids"):
            Settings(device_ids=bad)


def test_same_seeds_same_pixels_on_one_and_two_devices(engines, settings_factory):
    single = engines(settings_factory())
    hook, released = both_devices_gate()
    wrap = PerDevice(hook)
    double = engines(settings_factory(device_ids="0,1"), wrap)

    one = run(single, batch(single, 4, cfg_scale=1.5))
    two = run(double, batch(double, 4, cfg_scale=1.5))

    assert released.is_set()
    assert two.seeds == one.seeds == [11, 12, 13, 14]
    assert pixels(two) == pixels(one)                       # same pixels, same order
    assert two.warnings == one.warnings and two.steps_run == one.steps_run == [4] * 4
    assert wrap.calls[0, "unet"] > 0 and wrap.calls[1, "unet"] > 0   # both devices ran images
    assert wrap.calls[0, "unet"] + wrap.calls[1, "unet"] == 4 * 4 * 2
    assert sorted(set(wrap.wrapped_on)) == [0, 1]            # sessions made on each device's own thread
    rows = {row["index"]: row for row in double.health()["devices"]}
    assert rows[0]["images"] + rows[1]["images"] == 4 and rows[0]["images"] >= 1 and rows[1]["images"] >= 1


def test_interrupt_stops_the_task_on_every_device(engines, settings_factory):
    holder: list[Engine] = []
    both_in = {0: threading.Event(), 1: threading.Event()}

    def hook(device: int, role: str, call: int) -> None:
        if role == "unet" and call == 1:
            both_in[device].set()
            assert both_in[1 - device].wait(GATE_TIMEOUT_S)
            if device == 0:
                holder[0].interrupt()     # both images are in step 1 now
            else:
                assert wait_for(lambda: holder[0].progress.snapshot()["state"]["interrupted"])

    engine = engines(settings_factory(device_ids="0,1"), PerDevice(hook))
    holder.append(engine)
    result = run(engine, batch(engine, 4))
    assert result.interrupted and result.seeds == [11, 12]    # images 3 and 4 never started
    assert result.steps_run == [1, 1] and len(result.images) == 2
    assert not engine.progress.busy


def wait_for(condition: Callable[[], bool]) -> bool:
    done = threading.Event()
    for _ in range(int(GATE_TIMEOUT_S * 100)):
        if condition():
            return True
        done.wait(0.01)
    return False


def test_a_lost_device_leaves_the_other_serving_and_health_503_only_when_none_left(
        engines, settings_factory, make_client):
    device1_fails = threading.Event()
    device0_called = threading.Event()

    def hook(device: int, role: str, call: int) -> None:
        if device == 0 and role == "unet":
            device0_called.set()
            raise RuntimeError(DEVICE_GONE)
        if device == 1 and role == "unet":
            if call == 1:  # hold device 1 until device 0 has taken the other image
                assert device0_called.wait(GATE_TIMEOUT_S)
            if device1_fails.is_set():
                raise RuntimeError(DEVICE_GONE)

    settings = settings_factory(device_ids="0,1")
    client = make_client(settings, PerDevice(hook))
    body = {"prompt": "x", "batch_size": 2, "seed": 5}
    first = client.post("/sdapi/v1/txt2img", json=body)   # device 0 is lost under its image
    assert first.status_code == 200 and first.json()["info"]   # that image ran again on device 1
    again = client.post("/sdapi/v1/txt2img", json=body)   # device 1 alone: the same answer
    assert first.json()["images"] == again.json()["images"] and len(again.json()["images"]) == 2

    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    rows = {row["index"]: row for row in health.json()["devices"]}
    assert rows[0]["status"] == "lost" and "axclrt" in rows[0]["detail"] and rows[0]["failures"] == 1
    assert rows[1]["status"] == "ok"

    for seed in (6, 7):   # only device 1 is left: it serves every request
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 2, "seed": seed})
        assert answer.status_code == 200 and len(answer.json()["images"]) == 2
    metrics = client.get("/metrics").text
    assert 'sd_device_up{device="0"} 0.0' in metrics and 'sd_device_up{device="1"} 1.0' in metrics
    assert 'sd_device_failures_total{device="0"} 1.0' in metrics
    assert 'sd_device_images_total{device="0"} 0.0' in metrics
    assert 'sd_device_images_total{device="1"} 8.0' in metrics   # 4 requests x 2, the rerun included
    failed = [line for line in metrics.splitlines() if line.startswith('sd_jobs_total{outcome="failed"}')]
    assert all(float(line.split()[-1]) == 0 for line in failed)   # no request failed

    device1_fails.set()
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": 8}).status_code == 500
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "device_lost"
    refused = client.post("/sdapi/v1/txt2img", json={"prompt": "x"})
    assert refused.status_code == 503


def test_one_device_fault_fails_one_job_and_keeps_the_device(engines, settings_factory):
    """A failure that is not a device loss fails the job; both devices keep serving."""

    def hook(device: int, role: str, call: int) -> None:
        if device == 1 and role == "unet" and call == 1:
            raise RuntimeError("simulated runtime failure")

    gate_hook, _ = both_devices_gate()

    def combined(device: int, role: str, call: int) -> None:
        gate_hook(device, role, call)
        hook(device, role, call)

    engine = engines(settings_factory(device_ids="0,1"), PerDevice(combined))
    with pytest.raises(StageError, match="simulated runtime failure"):
        run(engine, batch(engine, 2))
    assert [row["status"] for row in engine.health()["devices"]] == ["ok", "ok"]
    assert len(run(engine, batch(engine, 4)).images) == 4


def test_a_device_that_fails_to_load_starts_the_service_degraded(engines, settings_factory, caplog):
    with caplog.at_level(logging.WARNING, logger=engine_module.__name__):
        engine = engines(settings_factory(device_ids="0,1"), PerDevice(fail_load=(1,)))
    assert any("DEGRADED" in r.message and "device 1" in r.message for r in caplog.records)
    health = engine.health()
    assert health["status"] == "degraded"
    rows = {row["index"]: row for row in health["devices"]}
    assert rows[1]["status"] == "load_failed" and "card 1 does not answer" in rows[1]["detail"]
    assert rows[0]["status"] == "ok"
    assert len(run(engine, batch(engine, 2)).images) == 2
    assert engine.health()["devices"][0]["images"] == 2


def test_require_all_devices_makes_a_failed_device_an_error(demo_models, settings_factory):
    engine = Engine(settings_factory(device_ids="0,1", require_all_devices=True), models=demo_models,
                    wrap=PerDevice(fail_load=(1,)))
    with pytest.raises(ModelLoadError, match=r"device 1: simulated: card 1 does not answer.*REQUIRE_ALL"):
        engine.start()
    engine.shutdown(1)


def test_no_device_loaded_is_an_error_naming_each(demo_models, settings_factory):
    engine = Engine(settings_factory(device_ids="0,1"), models=demo_models, wrap=PerDevice(fail_load=(0, 1)))
    with pytest.raises(ModelLoadError, match=r"no device loaded.*device 0: .*device 1: "):
        engine.start()
    assert not engine.started


def test_out_of_range_device_index_names_index_and_count(demo_models, settings_factory, monkeypatch):
    expected = r"^device index 3 is out of range: axengine found 2 NPU device\(s\); set DEVICE_ID to 0..1$"
    with pytest.raises(ModelLoadError, match=expected):
        check_device_indexes((0, 3), 2, "onnxruntime")
    check_device_indexes((0, 1), 2, "onnxruntime")
    check_device_indexes((7,), None, "onnxruntime")   # onnxruntime: no limit
    monkeypatch.setattr(engine_module, "device_count", lambda backend: 2)
    engine = Engine(settings_factory(device_ids="0,2"), models=demo_models)
    with pytest.raises(ModelLoadError, match="device index 2 is out of range: axengine found 2 NPU"):
        engine.start()
    assert not engine.devices   # nothing was loaded


def test_two_tasks_run_at_once_with_their_own_progress(engines, settings_factory):
    """Two one-image requests on two devices overlap; each task's progress is its own."""
    views: dict[str, dict] = {}
    holder: list[Engine] = []
    both_in = {0: threading.Event(), 1: threading.Event()}

    def hook(device: int, role: str, call: int) -> None:
        if role == "unet" and call == 2:
            both_in[device].set()
            assert both_in[1 - device].wait(GATE_TIMEOUT_S)
            if device == 0:
                for task in ("task(a)", "task(b)"):
                    views[task] = holder[0].task_progress(task)

    engine = engines(settings_factory(device_ids="0,1"), PerDevice(hook))
    holder.append(engine)

    async def scenario():
        return await asyncio.gather(
            engine.submit(engine.plan(batch(engine, 1, task_id="task(a)"))),
            engine.submit(engine.plan(batch(engine, 1, seed=99, task_id="task(b)"))))

    a, b = asyncio.run(scenario())
    assert a.seeds == [11] and b.seeds == [99]
    assert views["task(a)"]["active"] and views["task(b)"]["active"]
    assert views["task(a)"]["textinfo"] == "Image 1 out of 1"
    assert engine.task_progress("task(a)")["completed"] and engine.task_progress("task(b)")["completed"]


def test_check_models_lists_the_devices_and_checks_each(demo_pack, monkeypatch, capsys):
    from pi_axera_sd_service.cli import main

    monkeypatch.setenv("DEVICE_IDS", "0,1")
    assert main(["check-models", str(demo_pack), "--cache-dir", str(demo_pack.parent / "cache")]) == 0
    out = capsys.readouterr().out
    assert "devices: 0, 1 on onnxruntime" in out
    assert "device 0:" in out and "device 1:" in out and out.count("all models OK") == 2

    monkeypatch.setattr(engine_module, "device_count", lambda backend: 1)
    assert main(["check-models", str(demo_pack)]) != 0
    err = capsys.readouterr().err
    assert "device index 1 is out of range: axengine found 1 NPU device(s); set DEVICE_ID to 0" in err
    assert "Traceback" not in err
