"""The generation loop: one LCM loop for txt2img and img2img, with CFG, AND and prompt editing.

Randomness: one PCG64 generator per image, seeded with the image's seed. Draw order: initial
latent (txt2img) or posterior sample then img2img noise, then one noise per non-final step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from .conditioning import TextConditioner
from .images import image_to_nchw, nchw_to_image, resize_image
from .scheduler import VAE_SCALING_FACTOR, add_noise, lcm_step
from .stages import StageError, TextEncoder, UNet, VaeDecoder, VaeEncoder

if TYPE_CHECKING:
    from ..runtime.model_dir import LoadedModels
    from .tokenizer import ClipTokenizer

LOGVAR_RANGE = (-30.0, 20.0)
SLERP_LERP_THRESHOLD = 0.9995


@dataclass
class ImageJob:
    """One image, fully resolved by the service."""

    prompt: str
    negative_prompt: str
    seed: int
    subseed: int
    subseed_strength: float
    timesteps: list[int]
    cfg_scale: float
    init_image: Image.Image | None
    emphasis: str = "Original"
    max_and_prompts: int = 3


class JobControl(Protocol):
    """The worker's progress and interrupt hooks."""

    def on_step(self, step: int, steps: int, x0: np.ndarray | None) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass
class ImageOutput:
    image: Image.Image
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    unet_calls: int = 0
    steps_run: int = 0


def slerp(val: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Spherical interpolation as A1111 (norms over the whole tensor; lerp when nearly parallel)."""
    low_unit = low / np.linalg.norm(low)
    high_unit = high / np.linalg.norm(high)
    dot = float(np.sum(low_unit * high_unit, dtype=np.float64))
    if dot > SLERP_LERP_THRESHOLD:
        mixed = (1.0 - val) * low + val * high
    else:
        omega = np.arccos(dot)
        sin_omega = np.sin(omega)
        mixed = (np.sin((1.0 - val) * omega) / sin_omega) * low + (np.sin(val * omega) / sin_omega) * high
    return mixed.astype(np.float32)


class _ImageBuffers(threading.local):
    """Each thread's float image buffer for the VAE encoder's input, reused from image to image: an
    image-sized buffer made anew comes from fresh pages (a page fault per 4 KiB, ≈3 ms an image)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, ...], np.ndarray] = {}

    def get(self, shape: tuple[int, ...]) -> np.ndarray:
        buffer = self.buffers.get(shape)
        if buffer is None:
            buffer = self.buffers[shape] = np.empty(shape, dtype=np.float32)
        return buffer


class _Timer:
    """Accumulates milliseconds per key."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, *keys: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1000.0
            for key in keys:
                self.ms[key] = self.ms.get(key, 0.0) + elapsed


class Pipeline:
    """SD1.5-LCM over loaded model sessions."""

    def __init__(self, models: LoadedModels, tokenizer: ClipTokenizer):
        self.models = models
        self.tokenizer = tokenizer
        self.text_encoder = TextEncoder(models.text_encoder)
        self.unet = UNet(models.unet, models.unet_inputs)
        self.vae_decoder = VaeDecoder(models.vae_decoder)
        self.vae_encoder = VaeEncoder(models.vae_encoder) if models.vae_encoder is not None else None
        self._image_buffers = _ImageBuffers()

    def text_conditioner(self, emphasis: str = "Original") -> TextConditioner:
        """A conditioner whose embedding cache the images of one request share."""
        return TextConditioner(self.tokenizer, self.text_encoder, emphasis=emphasis)

    def generate(
        self, job: ImageJob, control: JobControl | None = None, conditioner: TextConditioner | None = None
    ) -> ImageOutput:
        """Run one image; stops early (decoding what it has) when control.should_stop().

        Pass the request's `conditioner` so each distinct text is encoded once per request.
        """
        timesteps = [int(t) for t in job.timesteps]
        time = self.models.time
        if not timesteps or not all(time.has(t) for t in timesteps):
            known = "the LCM skeleton t = 20k - 1" if time.full else str(time.timesteps)
            raise ValueError(f"timesteps must be a non-empty subset of {known}, got {timesteps}")
        timer = _Timer()
        warnings: list[str] = []
        rng = np.random.Generator(np.random.PCG64(job.seed))
        shape = tuple(self.models.latent_shape)
        guidance = job.cfg_scale > 1.0

        if conditioner is None or conditioner.emphasis != job.emphasis:
            conditioner = self.text_conditioner(job.emphasis)
        with timer("text"):
            plan = conditioner.plan(job.prompt, job.negative_prompt, steps=len(timesteps),
                                    max_and_prompts=job.max_and_prompts, guidance=guidance)
        warnings.extend(plan.warnings)

        if job.init_image is None:
            x = self._initial_noise(rng, job, shape)
        else:
            with timer("vae_encode"):
                z0 = self._encode_init_image(job.init_image, rng, warnings)
            x = add_noise(z0, self._initial_noise(rng, job, z0.shape), timesteps[0])

        unet_calls = 0
        steps_run = 0
        denoised = x
        for i, t in enumerate(timesteps):
            with timer("text"):
                conds, uncond = conditioner.conds_at(plan, i + 1)  # 1-based step
            time_row = self.models.time_input(t)
            with timer(f"unet_step_{i + 1}", "unet_total"):
                if guidance:
                    eps_uncond = self.unet.predict(x, time_row, uncond)
                    eps = eps_uncond.copy()
                    for embedding, weight in conds:
                        eps_cond = self.unet.predict(x, time_row, embedding)
                        eps += np.float32(weight * job.cfg_scale) * (eps_cond - eps_uncond)
                    unet_calls += 1 + len(conds)
                else:
                    eps = self.unet.predict(x, time_row, conds[0][0])
                    unet_calls += 1
            last = i == len(timesteps) - 1
            t_next = None if last else timesteps[i + 1]
            noise = None if last else rng.standard_normal(x.shape, dtype=np.float32)
            x, denoised = lcm_step(eps, x, t, t_next, noise)
            steps_run = i + 1
            if control is not None:
                control.on_step(steps_run, len(timesteps), denoised)
                if not last and control.should_stop():
                    break

        with timer("vae_decode"):
            image = self._decode(denoised)
        return ImageOutput(image=image, timings_ms=timer.ms, warnings=warnings,
                           unet_calls=unet_calls, steps_run=steps_run)

    def decode_preview(self, x0: np.ndarray) -> Image.Image:
        """Decode a denoised latent (for live previews)."""
        return self._decode(x0)

    def _decode(self, latent: np.ndarray) -> Image.Image:
        scaled = (latent / np.float32(VAE_SCALING_FACTOR)).astype(np.float32)
        return nchw_to_image(self.vae_decoder.decode(scaled), overwrite=True)  # a fresh output: ours

    def _initial_noise(self, rng: np.random.Generator, job: ImageJob, shape: tuple[int, ...]) -> np.ndarray:
        noise = rng.standard_normal(shape, dtype=np.float32)
        if job.subseed_strength != 0:
            sub_rng = np.random.Generator(np.random.PCG64(job.subseed))
            noise = slerp(job.subseed_strength, noise, sub_rng.standard_normal(shape, dtype=np.float32))
        return noise

    def _encode_init_image(
        self, image: Image.Image, rng: np.random.Generator, warnings: list[str]
    ) -> np.ndarray:
        """Init image -> scaled latent sample (posterior mean + std·noise) · 0.18215."""
        if self.vae_encoder is None:
            raise StageError("vae_encoder", "img2img unavailable: no VAE encoder model is loaded")
        size = tuple(self.models.image_size)
        if image.size != size:
            warnings.append(f"init image {image.size[0]}x{image.size[1]} stretched to {size[0]}x{size[1]}")
            image = resize_image(image, 0, size[0], size[1])
        pixels = image_to_nchw(image, out=self._image_buffers.get((1, 3, size[1], size[0])))
        moments = self.vae_encoder.encode(pixels)
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, *LOGVAR_RANGE))
        sample = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        return (sample * np.float32(VAE_SCALING_FACTOR)).astype(np.float32)
