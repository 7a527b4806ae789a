"""Issue 11 at the service: the steps a request runs follow the time inputs the loaded folder provides.

A folder with a time table (the demo pack ships one) runs 1..MAX_STEPS on diffusers' LCM timesteps; the
same folder without `time_input_table.npy` keeps the four published rows (1..4, more clamped with a
warning). The UNet calls are counted through the engine's `wrap` hook, and the timestep of each call is
read back from the time input it was fed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pi_axera_sd_service.api.app import create_app
from pi_axera_sd_service.runtime.model_dir import (
    TIME_TABLE_FILE,
    LoadedModels,
    load_models,
    resolve_model_files,
)
from pi_axera_sd_service.runtime.session import Session
from pi_axera_sd_service.service.engine import Engine
from pi_axera_sd_service.settings import Settings

PAYLOADS = Path(__file__).resolve().parents[1] / "compat_tests" / "payloads"
PICKER_PAYLOAD = PAYLOADS / "picker_generate_txt2img.json"
# diffusers' LCMScheduler.set_timesteps(n), original_inference_steps 50
DIFFUSERS_7 = [999, 859, 719, 579, 439, 299, 159]
DIFFUSERS_8 = [999, 879, 759, 639, 499, 379, 259, 139]


class UNetFeeds:
    """wrap(role, session): records the time input of every UNet call."""

    def __init__(self, time_input_name: str):
        self.time_input_name = time_input_name
        self.time_inputs: list[np.ndarray] = []

    def __call__(self, role: str, session: Session) -> Session:
        if role != "unet":
            return session
        feeds = self

        class Recording:
            path, backend, inputs, outputs = session.path, session.backend, session.inputs, session.outputs

            def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
                feeds.time_inputs.append(np.array(feed[feeds.time_input_name]))
                return session.run(feed)

        return Recording()  # type: ignore[return-value]

    def timesteps(self, table: np.ndarray) -> list[int]:
        """The timestep of each call: the index of the row of the full table it was fed."""
        found = []
        for fed in self.time_inputs:
            matches = np.flatnonzero(np.all(table == fed.reshape(1, -1), axis=1))
            assert len(matches) == 1, "a UNet call was fed a time input that is no row of the table"
            found.append(int(matches[0]))
        return found


@pytest.fixture(scope="module")
def demo_table(demo_pack: Path) -> np.ndarray:
    """The demo pack's full time table: row t is the time input of timestep t."""
    return np.load(demo_pack / "time_input_table.npy")


@pytest.fixture(scope="module")
def no_table_pack(demo_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo pack without its time table: the four published rows only."""
    folder = tmp_path_factory.mktemp("no_table") / "pack"
    shutil.copytree(demo_pack, folder)
    (folder / TIME_TABLE_FILE).unlink()
    return folder


@pytest.fixture(scope="module")
def no_table_models(no_table_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModels:
    files, backend = resolve_model_files(model_dir=no_table_pack, backend="onnxruntime")
    return load_models(files, backend, cache_dir=tmp_path_factory.mktemp("hash_cache"))


@pytest.fixture()
def serve(settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., tuple[TestClient, UNetFeeds]]]:
    """serve(models, **settings) -> (a started TestClient on those models, the UNet feed recorder)."""
    clients: list[TestClient] = []

    def make(models: LoadedModels, **overrides) -> tuple[TestClient, UNetFeeds]:
        feeds = UNetFeeds(models.unet_inputs.time)
        settings = settings_factory(**overrides)
        client = TestClient(create_app(settings, Engine(settings, models=models, wrap=feeds)))
        client.__enter__()
        clients.append(client)
        return client, feeds

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def _txt2img(client: TestClient, **body) -> dict:
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "seed": 3, "cfg_scale": 1, **body})
    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def test_demo_pack_has_a_time_table_and_the_copy_does_not(demo_models, no_table_models):
    assert demo_models.time.full and not no_table_models.time.full


def test_a_folder_with_a_table_runs_seven_steps_on_the_diffusers_schedule(serve, demo_models, demo_table):
    client, feeds = serve(demo_models)
    info = _txt2img(client, steps=7)
    assert info["steps"] == 7 and info["warnings"] == []
    assert "Steps: 7," in info["infotexts"][0]
    assert len(feeds.time_inputs) == 7
    assert feeds.timesteps(demo_table) == DIFFUSERS_7


def test_a_folder_with_a_table_clamps_at_max_steps(serve, demo_models, demo_table):
    client, feeds = serve(demo_models)
    info = _txt2img(client, steps=20)
    assert info["steps"] == 8 and info["warnings"] == ["steps 20 is not supported (1–8); ran 8"]
    assert feeds.timesteps(demo_table) == DIFFUSERS_8
    caps = client.get("/capabilities").json()
    assert (caps["time_table"], caps["max_steps"], caps["schedules"]["7"]) == (True, 8, DIFFUSERS_7)


def test_three_steps_with_a_table_run_diffusers_timesteps(serve, demo_models, demo_table):
    client, feeds = serve(demo_models)
    assert _txt2img(client, steps=3)["warnings"] == []
    assert feeds.timesteps(demo_table) == [999, 679, 339]


def test_max_steps_setting_limits_the_table(serve, demo_models, demo_table):
    client, feeds = serve(demo_models, max_steps=5)
    info = _txt2img(client, steps=7)
    assert info["steps"] == 5 and info["warnings"] == ["steps 7 is not supported (1–5); ran 5"]
    assert feeds.timesteps(demo_table) == [999, 799, 599, 399, 199]


def test_a_folder_without_a_table_keeps_the_four_rows(serve, no_table_models, no_table_pack):
    client, feeds = serve(no_table_models, model_dir=no_table_pack)
    info = _txt2img(client, steps=7)
    assert info["steps"] == 4 and info["warnings"] == ["steps 7 is not supported (1–4); ran 4"]
    assert len(feeds.time_inputs) == 4
    assert feeds.timesteps(no_table_models.time.rows) == [0, 1, 2, 3]   # the rows of 999, 759, 499, 259
    assert no_table_models.timesteps == (999, 759, 499, 259)
    feeds.time_inputs.clear()
    assert _txt2img(client, steps=3)["warnings"] == []
    assert feeds.timesteps(no_table_models.time.rows) == [0, 1, 3]      # 999, 759, 259
    caps = client.get("/capabilities").json()
    assert (caps["time_table"], caps["max_steps"], caps["timesteps"]) == (False, 4, [999, 759, 499, 259])


def test_the_pickers_seven_step_payload_runs_seven_steps_without_a_steps_warning(
    serve, demo_models, demo_table
):
    body = json.loads(PICKER_PAYLOAD.read_text(encoding="utf-8"))["body"]
    assert body["steps"] == 7 and body["cfg_scale"] > 1   # guidance: two UNet passes per step
    client, feeds = serve(demo_models)
    r = client.post("/generate", json=body)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    assert not [w for w in r.json()["warnings"] if "steps" in w], r.json()["warnings"]
    assert feeds.timesteps(demo_table) == [t for t in DIFFUSERS_7 for _ in (0, 1)]


def test_img2img_with_a_table_runs_the_tail_of_the_diffusers_schedule(
    serve, demo_models, demo_table, tmp_path
):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (512, 512), "teal").save(buf, format="PNG")
    client, feeds = serve(demo_models)
    r = client.post("/sdapi/v1/img2img", json={
        "prompt": "a lighthouse", "seed": 3, "cfg_scale": 1, "steps": 7, "denoising_strength": 0.5,
        "init_images": [base64.b64encode(buf.getvalue()).decode()],
    })
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["warnings"] == [] and "Steps: 7," in info["infotexts"][0]
    assert feeds.timesteps(demo_table) == DIFFUSERS_7[-4:]   # round(0.5 × 7) = 4 (halves up)
