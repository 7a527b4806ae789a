"""Engine and queue behaviour without HTTP: queue bound and timeout, interrupt/skip, disconnects,
stage faults and device loss, previews, per-task progress, shutdown draining."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from conftest import HANG_S

from pi_axera_sd_service.pipeline.stages import StageError
from pi_axera_sd_service.service.capabilities import CapabilityTable
from pi_axera_sd_service.service.engine import Engine
from pi_axera_sd_service.service.errors import (
    ClientDisconnectedError,
    DeviceLostError,
    QueueFullError,
    QueueTimeoutError,
    ShuttingDownError,
)
from pi_axera_sd_service.service.plan import GenerationPlan
from pi_axera_sd_service.service.queue import looks_like_device_loss
from pi_axera_sd_service.service.request import GenerationRequest
from pi_axera_sd_service.settings import Settings


@pytest.fixture()
def engines(demo_models) -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def make(settings, wrap=None) -> Engine:
        engine = Engine(settings, models=demo_models, wrap=wrap)
        engine.start()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown(5)


TABLE = CapabilityTable.from_models(
    SimpleNamespace(image_size=(512, 512), time=SimpleNamespace(full=False), vae_encoder=None), Settings()
)


def request(images: int = 1, steps: int = 4, task_id: str | None = None) -> GenerationRequest:
    return GenerationRequest(prompt="a lighthouse at dusk", seed=7, steps=steps, batch_size=images,
                             task_id=task_id)


def plan(images: int = 1, steps: int = 4, task_id: str | None = None) -> GenerationPlan:
    return TABLE.apply(request(images, steps, task_id))


async def wait_until(condition: Callable[[], bool], timeout: float = HANG_S) -> None:
    """Poll until `condition()` without blocking the event loop; the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_full_queue_refuses_at_once_and_accepted_jobs_complete(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    engine = engines(settings_factory(max_queue=2), wrap)

    async def scenario():
        first = asyncio.create_task(engine.submit(plan()))
        await wait_until(lambda: wrap.gates["unet"].held)
        tasks = [first] + [asyncio.create_task(engine.submit(plan())) for _ in range(5)]
        await wait_until(lambda: sum(t.done() for t in tasks) == 3)  # refused while the first is held
        assert wrap.gates["unet"].held and engine.queue.depth == 2
        wrap.open_gates()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, QueueFullError)]
    done = [r for r in results if not isinstance(r, Exception)]
    assert len(done) == 3 and len(refused) == 3  # one running + max_queue waiting
    assert all(r.retry_after >= 1 and "max_queue" in str(r) for r in refused)
    assert all(len(r.images) == 1 for r in done)
    assert engine.health()["status"] == "ok" and engine.queue.depth == 0


def test_queue_timeout_gives_503_error_and_job_never_runs(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    engine = engines(settings_factory(queue_timeout=0.2), wrap)

    async def scenario():
        first = asyncio.create_task(engine.submit(plan()))
        await wait_until(lambda: wrap.gates["unet"].held)  # the first job holds the NPU until we say
        with pytest.raises(QueueTimeoutError, match="queue_timeout"):
            await engine.submit(plan())
        wrap.open_gates()
        return await first

    assert len(asyncio.run(scenario()).images) == 1
    assert wrap.calls("text_encoder") == 1  # the timed-out job never reached the NPU


def test_interrupt_returns_partial_result_and_stops_remaining_images(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    engine = engines(settings_factory(), wrap)
    gate = wrap.gates["unet"]

    async def scenario():
        job = asyncio.create_task(engine.submit(plan(images=3)))
        gate.allow()
        await wait_until(lambda: gate.held and gate.passed == 1)  # step 2 of image 1 waits
        engine.interrupt()
        gate.open()
        return await job

    result = asyncio.run(scenario())
    assert result.interrupted
    assert len(result.images) == 1 and result.steps_run == [2]  # the held step 2 was the last
    assert engine.progress.snapshot()["state"]["job"] == ""


def test_skip_keeps_partial_image_and_moves_to_next(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    engine = engines(settings_factory(), wrap)
    gate = wrap.gates["unet"]

    async def scenario():
        job = asyncio.create_task(engine.submit(plan(images=2)))
        gate.allow()
        await wait_until(lambda: gate.held and gate.passed == 1)  # step 2 of image 1 waits
        engine.skip()
        gate.open()
        return await job

    result = asyncio.run(scenario())
    assert not result.interrupted
    assert len(result.images) == 2
    assert result.steps_run == [2, 4]  # image 1 stopped after the held step
    assert result.skipped_images == 1


def test_disconnected_queued_client_job_is_dropped(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    engine = engines(settings_factory(), wrap)

    async def disconnected() -> bool:  # the client leaves once its job is queued behind the held one
        return engine.queue.depth == 1

    async def scenario():
        first = asyncio.create_task(engine.submit(plan()))
        await wait_until(lambda: wrap.gates["unet"].held)
        with pytest.raises(ClientDisconnectedError):
            await engine.submit(plan(), disconnected)
        assert wrap.gates["unet"].held  # dropped while the first job still ran
        wrap.open_gates()
        return await first

    asyncio.run(scenario())
    assert engine.jobs_dropped == 1
    assert wrap.calls("text_encoder") == 1  # only the first job ran
    assert b'sd_rejections_total{reason="client_disconnected"} 1.0' in engine.metrics.exposition()


def test_stage_failure_fails_one_job_and_worker_carries_on(engines, settings_factory, wrap_factory):
    engine = engines(settings_factory(), wrap_factory(fail_calls={"unet": {3}}))

    async def scenario():
        with pytest.raises(StageError) as failed:
            await engine.submit(plan())
        return failed.value, await engine.submit(plan())

    error, ok = asyncio.run(scenario())
    assert error.stage == "unet" and "simulated runtime failure" in error.message
    assert len(ok.images) == 1
    assert engine.health()["status"] == "ok"
    assert engine.progress.snapshot()["state"]["job_count"] == 0


def test_device_loss_turns_health_503_and_fails_fast(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(fail_calls={"unet": {1}}, error="axclrtEngineExecute failed, ret 0x8030000b")
    engine = engines(settings_factory(), wrap)

    async def scenario():
        with pytest.raises(StageError):
            await engine.submit(plan())
        with pytest.raises(DeviceLostError):
            await engine.submit(plan())

    asyncio.run(scenario())
    assert wrap.calls("text_encoder") == 1  # the job after the loss never touched the NPU
    assert engine.health()["status"] == "device_lost"


def test_device_loss_heuristic():
    assert looks_like_device_loss("RuntimeError: axclrtMemcpy failed 0x80300")
    assert looks_like_device_loss("device 0 lost")
    assert not looks_like_device_loss("FeedError: expected [1, 77] int32, found [1, 76]")


def test_progress_snapshot_busy_then_idle(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    engine = engines(settings_factory(), wrap)
    gate = wrap.gates["unet"]
    seen: list[dict] = []

    async def scenario():
        job = asyncio.create_task(engine.submit(plan(images=2)))
        for call in range(8):  # 2 images x 4 steps: a snapshot while each UNet call is held
            await wait_until(lambda call=call: gate.held and gate.passed == call)
            seen.append(engine.progress.snapshot())
            gate.allow()
        await job

    asyncio.run(scenario())
    busy = [s for s in seen if s["state"]["job"]]
    assert busy and all(s["state"]["job"] == "scripts_txt2img" and s["state"]["job_count"] == 2 for s in busy)
    assert all(0.01 <= s["progress"] <= 1 for s in busy)
    assert len(busy) == 8 and len({(s["state"]["job_no"], s["state"]["sampling_step"]) for s in busy}) >= 6
    idle = engine.progress.snapshot()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None


def test_live_previews_decode_x0_only_when_enabled(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    engine = engines(settings_factory(live_previews=True, show_progress_every_n_steps=1), wrap)
    gate = wrap.gates["unet"]
    previews: list[str] = []
    task_views: list[dict] = []

    async def scenario():
        job = asyncio.create_task(engine.submit(plan(task_id="task(preview)")))
        for call in range(4):  # look while each UNet call is held: steps 1-3 have left a preview
            await wait_until(lambda call=call: gate.held and gate.passed == call)
            image = engine.progress.snapshot()["current_image"]
            if image:
                previews.append(image)
                view = engine.task_progress("task(preview)", id_live_preview=-1)
                if view["active"]:
                    again = engine.task_progress("task(preview)", id_live_preview=view["id_live_preview"])
                    task_views.append(view | {"again": again})
            gate.allow()
        return await job

    result = asyncio.run(scenario())
    assert len(previews) == 3 and wrap.calls("vae_decoder") == 4  # 3 previews (steps 1-3) + the final decode
    assert task_views and task_views[0]["live_preview"].startswith("data:image/png;base64,")
    for view in task_views:  # a preview the client already has is not sent again
        assert view["id_live_preview"] >= 1
        again = view["again"]
        assert again["live_preview"] is None or again["id_live_preview"] > view["id_live_preview"]
    assert result.stage_ms["vae_preview"] > 0


def test_task_progress_reports_queue_position(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    engine = engines(settings_factory(), wrap)

    async def scenario():
        jobs = [asyncio.create_task(engine.submit(plan(task_id=f"task(t{i})"))) for i in range(3)]
        await wait_until(lambda: wrap.gates["unet"].held and engine.queue.depth == 2)
        views = {i: engine.task_progress(f"task(t{i})") for i in range(3)}
        pending = engine.pending_tasks()
        wrap.open_gates()
        await asyncio.gather(*jobs)
        return views, pending

    views, pending = asyncio.run(scenario())
    assert views[0]["active"] and not views[0]["queued"]
    assert views[1]["queued"] and views[1]["queue_position"] == 0 and "In queue: 1/2" in views[1]["textinfo"]
    assert views[2]["queue_position"] == 1
    assert pending == ["task(t1)", "task(t2)"]
    assert engine.task_progress("task(t2)")["completed"]


def test_begin_shutdown_answers_queued_jobs_and_lets_running_finish(engines, settings_factory, wrap_factory):
    wrap = wrap_factory(gated=("unet",))
    engine = engines(settings_factory(), wrap)

    async def scenario():
        running = asyncio.create_task(engine.submit(plan()))
        await wait_until(lambda: wrap.gates["unet"].held)
        queued = asyncio.create_task(engine.submit(plan()))
        await wait_until(lambda: engine.queue.depth == 1)
        engine.begin_shutdown()
        with pytest.raises(ShuttingDownError):
            await queued
        with pytest.raises(ShuttingDownError):
            await engine.submit(plan())
        assert wrap.gates["unet"].held  # the running job is still running
        wrap.open_gates()
        return await running

    assert len(asyncio.run(scenario()).images) == 1


def test_a_batch_encodes_each_distinct_text_once(engines, settings_factory, wrap_factory):
    """Four images of one request with guidance: the prompt and the negative prompt are encoded once each."""
    wrap = wrap_factory()
    engine = engines(settings_factory(), wrap)
    req = GenerationRequest(prompt="a lighthouse at dusk", negative_prompt="fog", seed=3, batch_size=4,
                            cfg_scale=1.5)
    result = asyncio.run(engine.submit(engine.plan(req)))
    assert len(result.images) == 4 and result.seeds == [3, 4, 5, 6]
    assert wrap.calls("text_encoder") == 2
    assert wrap.calls("unet") == 4 * 4 * 2  # still two UNet passes per step for every image


def test_an_interrupt_after_the_last_step_cuts_nothing_and_is_not_reported(engines, settings_factory):
    """The interrupt lands while the last image is being decoded: every image is complete."""
    holder: list[Engine] = []

    class InterruptingDecoder:
        def __init__(self, inner):
            self.inner = inner
            self.path, self.backend, self.inputs, self.outputs = inner.path, inner.backend, inner.inputs, \
                inner.outputs

        def run(self, feed):
            holder[0].interrupt()
            return self.inner.run(feed)

    def wrap(role, session):
        return InterruptingDecoder(session) if role == "vae_decoder" else session

    engine = engines(settings_factory(), wrap)
    holder.append(engine)
    result = asyncio.run(engine.submit(plan()))
    assert result.steps_run == [4] and not result.interrupted


def test_jobs_after_a_failed_model_load_say_so(demo_models, settings_factory):
    engine = Engine(settings_factory(), models=demo_models)
    engine.load_error = "ModelLoadError: unet.axmodel: expected input sample [1,4,64,64]"
    with pytest.raises(DeviceLostError, match="failed to load") as raised:
        asyncio.run(engine.generate(lambda: request()))
    assert raised.value.retry_after is None


def test_parts_of_the_head_job_are_taken_in_order_before_the_next_job():
    from pi_axera_sd_service.service.queue import Job, JobQueue

    loop = asyncio.new_event_loop()
    try:
        queue = JobQueue(max_queue=4)
        first = Job("generate", None, "task(a)", loop, loop.create_future(), parts=3)
        second = Job("generate", None, "task(b)", loop, loop.create_future(), parts=2)
        assert queue.put(first) == 0 and queue.put(second) == 1
        a0, a1 = queue.take(0), queue.take(0)
        assert (a0.job, a0.index, a1.index) == (first, 0, 1)
        assert queue.depth == 1 and queue.waiting_task_ids() == ["task(b)"] and queue.position("task(b)") == 0
        assert not queue.remove(first)            # started: not removable
        a2 = queue.take(0)
        assert a2.index == 2 and queue.take(0).job is second
        assert not queue.done(a0) and not queue.done(a2) and queue.done(a1)   # the last one back
        assert queue.running == 1                 # the second job
        queue.abandon(second)                     # its part 1 is dropped
        assert queue.take(0) is None and queue.depth == 0
    finally:
        loop.close()


def test_a_part_whose_device_was_lost_runs_again_first_and_only_once():
    from pi_axera_sd_service.service.queue import Job, JobQueue

    loop = asyncio.new_event_loop()
    try:
        queue = JobQueue(max_queue=4)
        first = Job("generate", None, "task(a)", loop, loop.create_future(), parts=2)
        second = Job("generate", None, "task(b)", loop, loop.create_future(), parts=1)
        queue.put(first)
        queue.put(second)
        a0, a1 = queue.take(0), queue.take(0)
        assert queue.requeue(a0)                  # its device was lost under part 0
        assert not queue.done(a1)                 # part 0 still has to come back
        rerun = queue.take(0)
        assert (rerun.job, rerun.index) == (first, 0)   # before the job that waited behind it
        assert not queue.requeue(rerun)           # a second loss fails it instead
        assert queue.done(rerun) and queue.running == 0
        assert queue.take(0).job is second and queue.depth == 0
    finally:
        loop.close()
