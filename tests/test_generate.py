"""The generation loop on the demo pack: determinism, CFG/AND/editing passes, img2img tails, interrupt."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pi_axera_sd_service.pipeline.conditioning import TextConditioner
from pi_axera_sd_service.pipeline.generate import ImageJob, Pipeline
from pi_axera_sd_service.pipeline.images import encode_image, image_to_nchw
from pi_axera_sd_service.pipeline.scheduler import (
    alphas_cumprod,
    boundary_scalings,
    img2img_timesteps,
    txt2img_timesteps,
)
from pi_axera_sd_service.pipeline.stages import StageError, TextEncoder
from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer
from pi_axera_sd_service.runtime.demo_pack import demo_pack_dir
from pi_axera_sd_service.runtime.model_dir import load_models, resolve_model_files
from pi_axera_sd_service.runtime.session import Session, TensorSpec

PROMPT = "a red cat in a forest"


class RecordingSession:
    """Wraps a Session: records every feed and can be told to fail."""

    def __init__(self, inner: Session):
        self.inner = inner
        self.path, self.backend = inner.path, inner.backend
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.feeds: list[dict[str, np.ndarray]] = []
        self.fail_with: Exception | None = None

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append({name: np.array(value) for name, value in feed.items()})
        if self.fail_with is not None:
            raise self.fail_with
        return self.inner.run(feed)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pack = demo_pack_dir(tmp_path_factory.mktemp("cache"))
    files, backend = resolve_model_files(model_dir=pack, backend="onnxruntime")
    return load_models(files, backend, wrap=lambda _role, session: RecordingSession(session))


@pytest.fixture(scope="module")
def pipeline(models) -> Pipeline:
    return Pipeline(models, ClipTokenizer.from_dir(models.tokenizer_dir))


@pytest.fixture()
def unet(models) -> RecordingSession:
    models.unet.feeds.clear()
    models.unet.fail_with = None
    return models.unet


def _job(**overrides) -> ImageJob:
    fields = dict(prompt=PROMPT, negative_prompt="", seed=42, subseed=0, subseed_strength=0.0,
                  timesteps=txt2img_timesteps(4), cfg_scale=1.0, init_image=None)
    fields.update(overrides)
    return ImageJob(**fields)


def _png(pipeline: Pipeline, **overrides) -> bytes:
    return encode_image(pipeline.generate(_job(**overrides)).image, "png")


def _embedding(pipeline: Pipeline, text: str) -> np.ndarray:
    return TextConditioner(pipeline.tokenizer, pipeline.text_encoder).embedding(text)


def _contexts(unet: RecordingSession, pipeline: Pipeline) -> list[np.ndarray]:
    return [feed[pipeline.models.unet_inputs.context] for feed in unet.feeds]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=1e-5))


def test_same_seed_gives_identical_png_and_other_inputs_change_it(pipeline):
    first = _png(pipeline)
    assert first == _png(pipeline)
    assert Image.open(io.BytesIO(first)).size == tuple(pipeline.models.image_size)
    assert _png(pipeline, seed=43) != first
    assert _png(pipeline, prompt="a blue dog on a beach") != first


def test_subseed_only_matters_with_a_variation_strength(pipeline):
    base = _png(pipeline, subseed=7)
    assert _png(pipeline, subseed=8) == base
    varied = _png(pipeline, subseed=7, subseed_strength=0.5)
    assert varied != base
    assert varied == _png(pipeline, subseed=7, subseed_strength=0.5)
    assert _png(pipeline, subseed=8, subseed_strength=0.5) != varied


def test_cfg_one_makes_one_unet_pass_per_step_and_ignores_negative_prompt(pipeline, unet):
    out = pipeline.generate(_job(cfg_scale=1.0, negative_prompt="blurry"))
    assert out.unet_calls == len(unet.feeds) == 4
    assert out.steps_run == 4
    assert _png(pipeline, cfg_scale=1.0, negative_prompt="blurry") == _png(pipeline, cfg_scale=1.0)


def test_cfg_runs_the_negative_prompt_as_unconditional_pass(pipeline, unet):
    out = pipeline.generate(_job(cfg_scale=1.5, negative_prompt="blurry dark"))
    assert out.unet_calls == len(unet.feeds) == 8
    negative, positive = _embedding(pipeline, "blurry dark"), _embedding(pipeline, PROMPT)
    contexts = _contexts(unet, pipeline)
    for step in range(4):
        assert _same(contexts[2 * step], negative)
        assert _same(contexts[2 * step + 1], positive)
    with_negative = encode_image(out.image, "png")
    assert with_negative != _png(pipeline, cfg_scale=1.5)
    assert with_negative != _png(pipeline, cfg_scale=1.0, negative_prompt="blurry dark")


def test_cfg_without_negative_prompt_uses_the_empty_prompt(pipeline, unet):
    pipeline.generate(_job(cfg_scale=1.5, timesteps=[999]))
    assert _same(_contexts(unet, pipeline)[0], _embedding(pipeline, ""))


def test_and_sub_prompts_each_get_a_pass(pipeline, unet):
    out = pipeline.generate(_job(prompt="a red cat AND a blue sky", cfg_scale=1.5))
    assert out.unet_calls == len(unet.feeds) == 12
    contexts = _contexts(unet, pipeline)
    assert _same(contexts[1], _embedding(pipeline, "a red cat"))
    assert _same(contexts[2], _embedding(pipeline, "a blue sky"))


def test_prompt_editing_switches_embedding_mid_run(pipeline, unet):
    pipeline.generate(_job(prompt="a [cat:dog:0.5] in a forest"))
    contexts = _contexts(unet, pipeline)
    cat, dog = _embedding(pipeline, "a cat in a forest"), _embedding(pipeline, "a dog in a forest")
    used = ["cat" if _same(c, cat) else "dog" if _same(c, dog) else "?" for c in contexts]
    assert used == ["cat", "cat", "dog", "dog"]  # 0.5 of 4 steps: the first two use "cat"


@pytest.mark.parametrize(("strength", "expected_steps"), [(0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)])
def test_img2img_runs_the_schedule_tail(pipeline, unet, strength, expected_steps):
    init = Image.new("RGB", tuple(pipeline.models.image_size), (200, 40, 40))
    timesteps = img2img_timesteps(strength)
    out = pipeline.generate(_job(init_image=init, timesteps=timesteps))
    assert out.unet_calls == len(unet.feeds) == expected_steps == out.steps_run
    rows = pipeline.models.time_inputs
    time_name = pipeline.models.unet_inputs.time
    for feed, t in zip(unet.feeds, timesteps, strict=True):
        assert np.array_equal(feed[time_name][0], rows[pipeline.models.timesteps.index(t)])
    assert "vae_encode" in out.timings_ms


def test_img2img_follows_the_init_image_and_is_deterministic(pipeline):
    size = tuple(pipeline.models.image_size)
    red, blue = Image.new("RGB", size, (220, 30, 30)), Image.new("RGB", size, (30, 30, 220))
    light = img2img_timesteps(0.25)
    out_red = np.asarray(pipeline.generate(_job(init_image=red, timesteps=light)).image, dtype=float)
    out_blue = np.asarray(pipeline.generate(_job(init_image=blue, timesteps=light)).image, dtype=float)
    assert out_red[..., 0].mean() > out_blue[..., 0].mean()
    assert out_blue[..., 2].mean() > out_red[..., 2].mean()
    assert _png(pipeline, init_image=red, timesteps=light) == _png(pipeline, init_image=red, timesteps=light)


def test_init_image_of_another_size_is_stretched_with_a_warning(pipeline):
    out = pipeline.generate(_job(init_image=Image.new("RGB", (100, 60), "white"), timesteps=[259]))
    assert out.image.size == tuple(pipeline.models.image_size)
    assert any("stretched" in w for w in out.warnings)


class StopAfter:
    def __init__(self, steps: int):
        self.stop_at, self.seen = steps, []

    def on_step(self, step: int, steps: int, x0: np.ndarray | None) -> None:
        self.seen.append((step, steps, x0 is not None))

    def should_stop(self) -> bool:
        return self.seen[-1][0] >= self.stop_at


def test_interrupt_returns_the_image_so_far(pipeline, unet):
    control = StopAfter(2)
    out = pipeline.generate(_job(), control)
    assert out.steps_run == 2 and out.unet_calls == 2 == len(unet.feeds)
    assert control.seen == [(1, 4, True), (2, 4, True)]
    assert out.image.size == tuple(pipeline.models.image_size)
    assert encode_image(out.image, "png") != _png(pipeline)


def test_timings_cover_every_stage(pipeline):
    out = pipeline.generate(_job(timesteps=txt2img_timesteps(2)))
    assert {"text", "unet_step_1", "unet_step_2", "unet_total", "vae_decode"} <= set(out.timings_ms)
    assert out.timings_ms["unet_total"] == pytest.approx(
        out.timings_ms["unet_step_1"] + out.timings_ms["unet_step_2"])


def test_unet_failure_becomes_stage_error_with_runtime_message(pipeline, unet):
    unet.fail_with = RuntimeError("device lost: AXCL error 0x8003")
    with pytest.raises(StageError) as err:
        pipeline.generate(_job())
    assert err.value.stage == "unet" and "AXCL error 0x8003" in str(err.value)


def test_preview_decodes_a_latent(pipeline):
    latent = np.zeros(pipeline.models.latent_shape, np.float32)
    assert pipeline.decode_preview(latent).size == tuple(pipeline.models.image_size)


class Int32TextSession:
    """Reports int32 ids like the axmodel text encoder and records what it is fed."""

    path, backend = Path("te.axmodel"), "axengine"
    inputs = [TensorSpec("input_ids", (1, 77), np.dtype("int32"))]
    outputs = [TensorSpec("last_hidden_state", (1, 77, 768), np.dtype("float32"))]

    def __init__(self) -> None:
        self.fed: list[np.ndarray] = []

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.fed.append(feed["input_ids"])
        return [np.zeros((1, 77, 768), np.float32)]


def test_text_encoder_casts_ids_to_the_reported_dtype():
    session = Int32TextSession()
    out = TextEncoder(session).encode(list(range(77)))
    assert session.fed[0].dtype == np.int32 and session.fed[0].shape == (1, 77)
    assert out.shape == (1, 77, 768) and out.dtype == np.float32


def _spy_stages(pipeline: Pipeline, monkeypatch) -> dict[str, list]:
    """Record the raw arrays the loop hands to the UNet and VAE decoder (before any feed cast)."""
    seen: dict[str, list] = {"samples": [], "eps": [], "decoded": [], "dtypes": []}
    predict, decode = pipeline.unet.predict, pipeline.vae_decoder.decode

    def spy_predict(sample, time_row, context):
        seen["dtypes"] += [np.asarray(sample).dtype, np.asarray(time_row).dtype, np.asarray(context).dtype]
        seen["samples"].append(np.array(sample))
        eps = predict(sample, time_row, context)
        seen["eps"].append(eps)
        return eps

    def spy_decode(latent):
        seen["dtypes"].append(np.asarray(latent).dtype)
        seen["decoded"].append(np.array(latent))
        return decode(latent)

    monkeypatch.setattr(pipeline.unet, "predict", spy_predict)
    monkeypatch.setattr(pipeline.vae_decoder, "decode", spy_decode)
    return seen


def test_two_step_schedule_renoises_to_the_next_timestep_and_not_after_the_last(pipeline, unet, monkeypatch):
    seen = _spy_stages(pipeline, monkeypatch)
    pipeline.generate(_job(timesteps=[999, 499], seed=5, cfg_scale=1.5, negative_prompt="dark"))
    assert set(seen["dtypes"]) == {np.dtype("float32")}  # no float64 reaches a session feed
    rng = np.random.Generator(np.random.PCG64(5))
    shape = pipeline.models.latent_shape
    x = rng.standard_normal(shape, dtype=np.float32)
    assert np.array_equal(seen["samples"][0], x)
    acp = alphas_cumprod().astype(np.float64)

    def guided(step: int) -> np.ndarray:
        uncond, cond = seen["eps"][2 * step], seen["eps"][2 * step + 1]
        return uncond + 1.5 * (cond - uncond)

    def denoise(x: np.ndarray, eps: np.ndarray, t: int) -> np.ndarray:
        x0 = (x - np.sqrt(1 - acp[t]) * eps) / np.sqrt(acp[t])
        c_skip, c_out = boundary_scalings(t)
        return c_out * x0 + c_skip * x

    d1 = denoise(x, guided(0), 999)
    noise = rng.standard_normal(shape, dtype=np.float32)
    expected = np.sqrt(acp[499]) * d1 + np.sqrt(1 - acp[499]) * noise  # ᾱ of 499, the next step here
    np.testing.assert_allclose(seen["samples"][2], expected, atol=2e-5)
    d2 = denoise(seen["samples"][2], guided(1), 499)
    np.testing.assert_allclose(seen["decoded"][0], d2 / 0.18215, atol=1e-4)  # no noise after the last


def test_img2img_adds_noise_at_the_first_timestep_of_the_tail(pipeline, unet, monkeypatch):
    seen = _spy_stages(pipeline, monkeypatch)
    init = Image.new("RGB", tuple(pipeline.models.image_size), (200, 40, 40))
    pipeline.generate(_job(init_image=init, timesteps=[499, 259], seed=9))
    moments = pipeline.vae_encoder.encode(image_to_nchw(init)).astype(np.float64)
    mean, logvar = moments[:, :4], np.clip(moments[:, 4:], -30, 20)
    rng = np.random.Generator(np.random.PCG64(9))
    z0 = (mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32)) * 0.18215
    noise = rng.standard_normal(mean.shape, dtype=np.float32)
    acp = alphas_cumprod().astype(np.float64)
    expected = np.sqrt(acp[499]) * z0 + np.sqrt(1 - acp[499]) * noise
    np.testing.assert_allclose(seen["samples"][0], expected, atol=2e-5)
    assert set(seen["dtypes"]) == {np.dtype("float32")}


def test_same_seed_gives_the_same_png_in_another_process(pipeline, unet):
    script = (
        "import sys\n"
        "from pi_axera_sd_service.pipeline.generate import ImageJob, Pipeline\n"
        "from pi_axera_sd_service.pipeline.images import encode_image\n"
        "from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer\n"
        "from pi_axera_sd_service.runtime.model_dir import load_models, resolve_model_files\n"
        "files, backend = resolve_model_files(model_dir=sys.argv[1], backend='onnxruntime')\n"
        "models = load_models(files, backend)\n"
        "p = Pipeline(models, ClipTokenizer.from_dir(models.tokenizer_dir))\n"
        "job = ImageJob(prompt=sys.argv[2], negative_prompt='', seed=42, subseed=3, subseed_strength=0.3,"
        " timesteps=[999, 759, 499, 259], cfg_scale=1.0, init_image=None)\n"
        "sys.stdout.buffer.write(encode_image(p.generate(job).image, 'png'))\n"
    )
    pack = str(pipeline.models.files.unet.parent)
    other = subprocess.run([sys.executable, "-c", script, pack, PROMPT], capture_output=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}).stdout
    assert other == _png(pipeline, subseed=3, subseed_strength=0.3)
