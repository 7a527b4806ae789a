"""LCM scheduler: constants of diffusers' LCMScheduler for SD1.5, schedules, and step math."""

from __future__ import annotations

import numpy as np
import pytest

from pi_axera_sd_service.pipeline import scheduler
from pi_axera_sd_service.pipeline.scheduler import (
    TIMESTEPS,
    add_noise,
    alphas_cumprod,
    boundary_scalings,
    img2img_timesteps,
    lcm_step,
    lcm_timesteps,
    max_schedule_steps,
    txt2img_timesteps,
)

# diffusers LCMScheduler (scaled_linear betas 0.00085..0.012, 1000 steps): t, ᾱ, √ᾱ, √(1−ᾱ), c_skip, c_out
TABLE = [
    (999, 0.0046601, 0.068265, 0.997667, 2.5e-9, 0.999999999),
    (759, 0.0522129, 0.228501, 0.973544, 4.3e-9, 0.999999998),
    (499, 0.2776697, 0.526944, 0.849900, 1.0e-8, 0.999999995),
    (259, 0.6589755, 0.811773, 0.583973, 3.7e-8, 0.99999998),
]


@pytest.mark.parametrize(("t", "acp", "sqrt_acp", "sqrt_one_minus", "c_skip", "c_out"), TABLE)
def test_constants_match_reference_table(t, acp, sqrt_acp, sqrt_one_minus, c_skip, c_out):
    a = alphas_cumprod()
    assert a.dtype == np.float32 and a.shape == (1000,)
    assert a[t] == pytest.approx(acp, abs=1e-6)
    assert np.sqrt(a[t]) == pytest.approx(sqrt_acp, abs=1e-6)
    assert np.sqrt(1 - a[t]) == pytest.approx(sqrt_one_minus, abs=1e-6)
    got_skip, got_out = boundary_scalings(t)
    assert got_skip == pytest.approx(c_skip, rel=0.03)  # table gives two significant digits
    assert got_out == pytest.approx(c_out, abs=1e-6)


def test_txt2img_schedules():
    assert txt2img_timesteps(1) == [999]
    assert txt2img_timesteps(2) == [999, 499]
    assert txt2img_timesteps(3) == [999, 759, 259]
    assert txt2img_timesteps(4) == list(TIMESTEPS)
    with pytest.raises(ValueError):
        txt2img_timesteps(5)


@pytest.mark.parametrize(
    ("strength", "expected"),
    [
        (0.0, [259]),
        (0.25, [259]),
        (0.5, [499, 259]),
        (0.6, [499, 259]),
        (0.75, [759, 499, 259]),
        (1.0, [999, 759, 499, 259]),
        (1.7, [999, 759, 499, 259]),
    ],
)
def test_img2img_runs_the_tail_of_the_schedule(strength, expected):
    assert img2img_timesteps(strength) == expected


def test_lcm_step_recovers_x0_from_exact_noise_prediction():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    eps = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    x = add_noise(x0, eps, 759)
    assert x.dtype == np.float32
    fresh = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    x_next, denoised = lcm_step(eps, x, 759, 499, fresh)
    # c_skip is ~4e-9, so denoised is x0 to float32 precision
    np.testing.assert_allclose(denoised, x0, atol=1e-4)
    # the next sample is x0 re-noised to t=499 with the fresh noise
    np.testing.assert_allclose(x_next, add_noise(x0, fresh, 499), atol=1e-4)
    assert x_next.dtype == np.float32 and denoised.dtype == np.float32


def test_last_step_returns_denoised_without_noise():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    eps = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    x_next, denoised = lcm_step(eps, x, 259, None, None)
    assert np.array_equal(x_next, denoised)
    a = float(alphas_cumprod()[259])
    expected = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    np.testing.assert_allclose(denoised, expected, atol=1e-5)


def test_alphas_cumprod_is_read_only():
    with pytest.raises(ValueError):
        scheduler.alphas_cumprod()[0] = 1.0


def test_diffusers_schedules_from_pipeline_md():
    assert lcm_timesteps(3) == [999, 679, 339]
    assert lcm_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert txt2img_timesteps(3, full_table=True) == [999, 679, 339]
    assert txt2img_timesteps(4, full_table=True) == list(TIMESTEPS)  # the four rows are diffusers' 4 steps
    assert max_schedule_steps(False, 8) == 4 and max_schedule_steps(True, 8) == 8
    assert max_schedule_steps(True, 500) == 50
    with pytest.raises(ValueError):
        lcm_timesteps(51)


@pytest.mark.parametrize("steps", range(1, 9))
def test_lcm_timesteps_equal_diffusers(steps):
    pytest.importorskip("diffusers", reason="needs the export extra (diffusers)")
    from diffusers import LCMScheduler

    reference = LCMScheduler(beta_schedule="scaled_linear", original_inference_steps=50)
    reference.set_timesteps(steps)
    assert lcm_timesteps(steps) == reference.timesteps.tolist()
    for strength in (0.25, 0.5, 0.75, 1.0):  # diffusers' img2img pipeline: the last int(steps*strength)
        count = min(int(steps * strength), steps)
        if count and abs(steps * strength - round(steps * strength)) < 1e-9:
            assert img2img_timesteps(strength, steps, True) == reference.timesteps.tolist()[steps - count:]
