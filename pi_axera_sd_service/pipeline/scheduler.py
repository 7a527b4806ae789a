"""LCM scheduler math in numpy (diffusers `LCMScheduler.step`, done by hand).

Two kinds of schedule, depending on the time inputs a model folder has:
- a full time table (a row for every timestep 0..999): diffusers' `LCMScheduler.set_timesteps`
  schedule for any step count 1..50 (`original_inference_steps` 50);
- only the four upstream rows (999, 759, 499, 259): the fixed subsets of those for 1..4 steps.
Everything is float32, as the NPU sessions require.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..runtime.contract import NUM_TRAIN_TIMESTEPS, ORIGINAL_INFERENCE_STEPS, TIMESTEPS

BETA_START = 0.00085
BETA_END = 0.012
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5
VAE_SCALING_FACTOR = 0.18215

_TXT2IMG_SCHEDULES: dict[int, tuple[int, ...]] = {
    1: (999,),
    2: (999, 499),
    3: (999, 759, 259),
    4: TIMESTEPS,
}


@lru_cache(maxsize=1)
def _alphas_cumprod() -> np.ndarray:
    betas = np.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float32) ** 2
    acp = np.cumprod(1.0 - betas, dtype=np.float32)
    acp.setflags(write=False)
    return acp


def alphas_cumprod() -> np.ndarray:
    """ᾱ_t for t = 0..999 (float32, scaled_linear betas, read-only)."""
    return _alphas_cumprod()


def boundary_scalings(t: int) -> tuple[float, float]:
    """(c_skip, c_out) of the LCM boundary condition at timestep `t` (σ_data 0.5, scaling 10)."""
    scaled = TIMESTEP_SCALING * float(t)
    denom = scaled**2 + SIGMA_DATA**2
    return SIGMA_DATA**2 / denom, scaled / denom**0.5


def lcm_timesteps(steps: int, original_steps: int = ORIGINAL_INFERENCE_STEPS) -> list[int]:
    """diffusers' `LCMScheduler.set_timesteps(steps)` (strength 1): `steps` evenly spaced indices,
    floor(linspace(0, original_steps, steps, endpoint=False)), into the descending skeleton
    t = k*i - 1 (k = 1000 // original_steps, i = original_steps..1)."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"steps must be 1..{original_steps}, got {steps}")
    k = NUM_TRAIN_TIMESTEPS // original_steps
    skeleton = np.arange(original_steps, 0, -1) * k - 1
    indices = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in skeleton[indices]]


def max_schedule_steps(full_table: bool, limit: int) -> int:
    """The most steps a model folder can run: `limit` (at most 50) with a full time table, else 4."""
    if not full_table:
        return len(TIMESTEPS)
    return max(1, min(int(limit), ORIGINAL_INFERENCE_STEPS))


def txt2img_timesteps(steps: int, full_table: bool = False) -> list[int]:
    """Timesteps for `steps` steps (the caller clamps `steps` to `max_schedule_steps`).

    With a full table: diffusers' LCM schedule; with only the four rows: the fixed subsets for 1..4.
    """
    if full_table:
        return lcm_timesteps(steps)
    if steps not in _TXT2IMG_SCHEDULES:
        raise ValueError(f"steps must be 1..4 with the four time rows, got {steps}")
    return list(_TXT2IMG_SCHEDULES[steps])


def img2img_timesteps(strength: float, n: int = 4, full_table: bool = False) -> list[int]:
    """The last clamp(round(strength*n), 1, n) timesteps of the n-step schedule (halves round up)."""
    full = txt2img_timesteps(n, full_table)
    count = min(max(math.floor(strength * n + 0.5), 1), n)
    return full[n - count :]


def add_noise(z0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
    """Forward diffusion to timestep `t`: √ᾱ·z0 + √(1−ᾱ)·noise (float32)."""
    a = _alphas_cumprod()[t]
    return (np.sqrt(a) * z0 + np.sqrt(np.float32(1.0) - a) * noise).astype(np.float32)


def lcm_step(
    eps: np.ndarray, x: np.ndarray, t: int, t_prev: int | None, noise: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """One LCM step. Returns (x_next, denoised).

    `t_prev` is the next timestep of the run schedule; `noise` is None on the last step, where
    x_next is the denoised latent itself.
    """
    acp = _alphas_cumprod()
    a = acp[t]
    x0 = (x - np.sqrt(np.float32(1.0) - a) * eps) / np.sqrt(a)
    c_skip, c_out = boundary_scalings(t)
    denoised = (np.float32(c_out) * x0 + np.float32(c_skip) * x).astype(np.float32)
    if noise is None or t_prev is None:
        return denoised, denoised
    a_prev = acp[t_prev]
    x_next = np.sqrt(a_prev) * denoised + np.sqrt(np.float32(1.0) - a_prev) * noise
    return x_next.astype(np.float32), denoised
