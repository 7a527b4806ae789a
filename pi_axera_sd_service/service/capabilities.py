"""The hardware capability table: one data structure, built at start-up, that decides every request field.

Each row says what is supported and what happens otherwise: `accept`, `warn` (run anyway, say so),
`clamp` (change the value, warn) or `reject` (422). `strict` turns every clamp, and an unknown
sampler, into a 422. `to_dict()` is served at GET /capabilities and is the source of the docs.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..pipeline.images import resize_image
from ..pipeline.scheduler import img2img_timesteps, max_schedule_steps, txt2img_timesteps
from ..runtime.contract import LCM_SKELETON, TIMESTEPS
from ..settings import Settings
from .errors import CapabilityError, RequestError
from .options import WRITABLE_DEFAULTS, OptionsStore, known_option, validate_option
from .plan import GenerationPlan, ImagePlan, new_task_id
from .request import UPSTREAM_DENOISING_STRENGTH, GenerationRequest

if TYPE_CHECKING:
    from ..runtime.model_dir import LoadedModels

SAMPLER_NAME = "LCM"
SAMPLER_ALIASES = ("k_lcm", "lcm")
SCHEDULER_NAME = "automatic"
# A1111 scheduler names and labels, recognised as a sampler-name suffix ("DPM++ 2M Karras").
A1111_SCHEDULERS = (
    ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
    ("polyexponential", "Polyexponential"), ("sgm_uniform", "SGM Uniform"), ("sgm_uniform", "SGMUniform"),
    ("kl_optimal", "KL Optimal"), ("align_your_steps", "Align Your Steps"), ("simple", "Simple"),
    ("normal", "Normal"), ("ddim", "DDIM"), ("beta", "Beta"), ("karras_exponential", "Karras Exponential"),
)
MIN_DENOISING_STRENGTH = 0.01
DEFAULT_DENOISING_STRENGTH = 0.75   # A1111's, for img2img requests that leave it out
SEED_RANGE = 2**32
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill (edges stretched)"}
NO_STYLE_NAMES = {"", "none"}  # what clients send for "no style" (AIYA: "None")


@dataclass(frozen=True)
class CapabilityRow:
    """One request field: what is supported, and the action taken otherwise."""

    field: str
    supported: str
    otherwise: str          # accept | warn | clamp | reject
    note: str
    strict_rejects: bool = False   # besides clamps, also a 422 under `strict`

    def action(self, strict: bool) -> str:
        if strict and (self.otherwise == "clamp" or self.strict_rejects):
            return "reject"
        return self.otherwise


@dataclass
class CapabilityTable:
    """Everything the loaded models and the settings allow, plus the policy for everything else."""

    image_size: tuple[int, int]
    time_table: bool        # the models have a time row for every timestep 0..999 (any LCM schedule)
    max_steps: int          # 4 with the four upstream rows; the `max_steps` setting with a time table
    img2img: bool
    strict: bool
    guidance: bool
    max_cfg_scale: float
    max_images_per_request: int
    max_and_prompts: int

    @classmethod
    def from_models(cls, models: LoadedModels, settings: Settings) -> CapabilityTable:
        return cls(
            image_size=(int(models.image_size[0]), int(models.image_size[1])),
            time_table=models.time.full,
            max_steps=max_schedule_steps(models.time.full, settings.max_steps),
            img2img=models.vae_encoder is not None,
            strict=settings.strict,
            guidance=settings.guidance == "on",
            max_cfg_scale=float(settings.max_cfg_scale),
            max_images_per_request=int(settings.max_images_per_request),
            max_and_prompts=int(settings.max_and_prompts),
        )

    @property
    def default_steps(self) -> int:
        """Steps run when a request leaves them out: the upstream 4-step schedule (the same timesteps
        with or without a time table), fewer if `max_steps` is lower."""
        return min(len(TIMESTEPS), self.max_steps)

    def schedule(self, steps: int) -> list[int]:
        """The txt2img timesteps of a `steps`-step schedule on these models (1 ≤ steps ≤ max_steps)."""
        return txt2img_timesteps(steps, self.time_table)

    # ------------------------------------------------------------------ the table
    @cached_property
    def rows(self) -> list[CapabilityRow]:
        w, h = self.image_size
        schedules = ", ".join(f"{n}→{self.schedule(n)}" for n in range(1, self.max_steps + 1))
        steps_source = (
            f"diffusers' LCM schedules from the time table, MAX_STEPS {self.max_steps}" if self.time_table
            else "the four stored time rows; a time table (time_input_table.npy) allows up to MAX_STEPS"
        )
        guidance = (
            f"cfg ≤ 1: one UNet pass per step; 1 < cfg ≤ {self.max_cfg_scale:g}: classifier-free guidance "
            "with the negative prompt (two UNet passes per step)"
            if self.guidance else "guidance=off: always one UNet pass per step (cfg 1)"
        )
        return [
            CapabilityRow("mode", "txt2img" + (", img2img" if self.img2img else ""), "reject",
                          "img2img needs the VAE encoder model"),
            CapabilityRow("width, height", f"{w}x{h} (the compiled models' size)", "clamp",
                          f"other sizes are generated at {w}x{h}"),
            CapabilityRow("steps", f"1–{self.max_steps}, default {self.default_steps}: {schedules}", "clamp",
                          f"more steps run {self.max_steps} ({steps_source}); img2img runs the last "
                          "round(denoising_strength × steps) of them"),
            CapabilityRow("sampler_name, sampler_index",
                          f"{SAMPLER_NAME} (aliases {', '.join(SAMPLER_ALIASES)})", "warn",
                          "other samplers run LCM, as A1111 falls back on unknown names; strict: 422",
                          strict_rejects=True),
            CapabilityRow("scheduler", SCHEDULER_NAME, "warn",
                          "the LCM schedule is fixed; a scheduler suffix of the sampler name counts too"),
            CapabilityRow("cfg_scale", guidance, "clamp", f"cfg above {self.max_cfg_scale:g} runs at "
                          f"{self.max_cfg_scale:g}; default 1 (one pass)"),
            CapabilityRow("negative_prompt", "used with classifier-free guidance (cfg > 1)", "warn",
                          "at cfg ≤ 1 (or guidance=off) a negative prompt has no effect"),
            CapabilityRow("seed, subseed", "integers; -1, null or \"\" draw a random seed in [0, 2^32)",
                          "reject", "image i gets seed+i (the same seed for all when subseed_strength ≠ 0), "
                          "subseed+i; a non-integer seed is a 422"),
            CapabilityRow("subseed_strength", "0–1: variation noise slerp(strength, noise(seed), "
                          "noise(subseed)) as A1111", "clamp", "clamped into [0, 1]"),
            CapabilityRow("batch_size, n_iter",
                          f"batch_size × n_iter ≤ {self.max_images_per_request} images, generated one "
                          "at a time (the NPU batch is 1)", "clamp",
                          "n_iter is reduced first, then batch_size"),
            CapabilityRow("denoising_strength",
                          f"img2img: (0, 1]; default {DEFAULT_DENOISING_STRENGTH:g} on /sdapi, "
                          f"{UPSTREAM_DENOISING_STRENGTH:g} on /generate and the CLI",
                          "clamp", "ignored for txt2img (no hires fix)"),
            CapabilityRow("resize_mode", "0 just resize, 1 crop and resize, 2 resize and fill (edges "
                          "stretched); 3 (latent) is run as 0 with a warning", "reject", "other values: 422"),
            CapabilityRow("init_images", "raw base64 or data:image/...;base64, URIs; PNG/JPEG/WEBP; EXIF "
                          "orientation applied; cycled over the batch", "reject",
                          "undecodable: 400; img2img without init_images: 404 \"Init image not found\""),
            CapabilityRow("mask, latent_mask", "not supported", "reject",
                          "a mask is a 422 \"inpainting is not supported\" (the other inpainting fields are "
                          "accepted at any value and have no effect)"),
            CapabilityRow("enable_hr, restore_faces, tiling, styles, clip_skip, seed_resize_from_w/h",
                          "not supported", "warn", "true / non-empty / clip_skip > 1 / > 0: ignored with "
                          "a warning; the values clients send by default are silent"),
            CapabilityRow("script_name, alwayson_scripts", "no scripts installed", "reject",
                          "422 \"Script '<name>' not found\" / \"always on script <name> not found\" "
                          "as A1111"),
            CapabilityRow("override_settings", "the options of GET /sdapi/v1/options, for this request only",
                          "warn", "unknown keys are ignored with a warning"),
            CapabilityRow("eta, s_churn, s_tmin, s_tmax, s_noise, s_min_uncond, image_cfg_scale, "
                          "hr_* (with enable_hr false)", "no effect on LCM", "accept", "accepted silently"),
        ]

    def row(self, field: str) -> CapabilityRow:
        for row in self.rows:
            if field in [name.strip() for name in row.field.split(",")]:
                return row
        raise KeyError(field)

    def to_dict(self) -> dict[str, Any]:
        """The table as JSON: limits plus one entry per row (field, supported, otherwise, strict, note)."""
        return {
            "policy": "strict" if self.strict else "lenient",
            "image_size": {"width": self.image_size[0], "height": self.image_size[1]},
            "time_table": self.time_table,
            "timesteps": sorted(LCM_SKELETON, reverse=True) if self.time_table else list(TIMESTEPS),
            "max_steps": self.max_steps,
            "default_steps": self.default_steps,
            "schedules": {str(n): self.schedule(n) for n in range(1, self.max_steps + 1)},
            "modes": ["txt2img", "img2img"] if self.img2img else ["txt2img"],
            "guidance": "on" if self.guidance else "off",
            "max_cfg_scale": self.max_cfg_scale,
            "max_images_per_request": self.max_images_per_request,
            "max_and_prompts": self.max_and_prompts,
            "samplers": [SAMPLER_NAME],
            "schedulers": [SCHEDULER_NAME],
            "rows": [
                {"field": r.field, "supported": r.supported, "otherwise": r.otherwise,
                 "strict": r.action(True), "note": r.note}
                for r in self.rows
            ],
        }

    # ------------------------------------------------------------------ the policy
    def _deviate(
        self, row_field: str, field: str, problem: str, outcome: str, warnings: list[str], supported: str = ""
    ) -> None:
        """Warn "<problem>; <outcome>" (what ran instead), or, when the row's action under the policy is
        `reject`, raise CapabilityError saying the value was refused (nothing ran) and what is supported.

        `supported` is added to the refusal when `problem` does not already state the range."""
        if self.row(row_field).action(self.strict) == "reject":
            refusal = f"{problem}; refused in strict mode" if self.strict else f"{problem}; refused"
            raise CapabilityError(field, f"{refusal} (supported: {supported})" if supported else refusal)
        warnings.append(f"{problem}; {outcome}")

    def apply(
        self, req: GenerationRequest, options: OptionsStore | Mapping[str, Any] | None = None
    ) -> GenerationPlan:
        """The plan that runs for `req`: every value chosen, clamps warned; CapabilityError for rejections.

        `options` (the OptionsStore or a plain dict) gives the defaults `override_settings` override."""
        warnings: list[str] = []
        self._check_mode_and_scripts(req)
        sampler, scheduler = self._sampler(req, warnings)
        width, height = self._size(req, warnings)
        steps = self._steps(req, warnings)
        cfg_scale = self._guidance(req, warnings)
        subseed_strength = self._subseed_strength(req, warnings)
        batch_size, n_iter = self._image_count(req, warnings)
        strength, resize_mode = self._img2img(req, warnings)
        self._unsupported(req, warnings)
        effective = self._options(req, options, warnings)
        images = self._images(req, batch_size * n_iter, subseed_strength != 0, resize_mode, (width, height))
        timesteps = self.timesteps_for(steps, strength if req.mode == "img2img" else None)
        return GenerationPlan(
            task_id=req.task_id or new_task_id(req.mode), mode=req.mode, prompt=req.prompt,
            negative_prompt=req.negative_prompt, width=width, height=height, steps=steps,
            timesteps=timesteps, sampler_name=sampler, scheduler=scheduler, cfg_scale=cfg_scale,
            subseed_strength=subseed_strength, denoising_strength=strength, resize_mode=resize_mode,
            batch_size=batch_size, n_iter=n_iter, images=images,
            emphasis=str(effective["emphasis"]), max_and_prompts=self.max_and_prompts, clip_skip=1,
            samples_format=(req.samples_format or str(effective["samples_format"])).lower(),
            jpeg_quality=int(effective["jpeg_quality"]), send_images=req.send_images,
            save_images=req.save_images, warnings=tuple(dict.fromkeys((*req.warnings, *warnings))),
        )

    def timesteps_for(self, steps: int, denoising_strength: float | None = None) -> tuple[int, ...]:
        """The timesteps a `steps`-step schedule runs; img2img (a strength) runs its tail."""
        if denoising_strength is None:
            return tuple(self.schedule(steps))
        return tuple(img2img_timesteps(denoising_strength, steps, self.time_table))

    def _check_mode_and_scripts(self, r: GenerationRequest) -> None:
        if r.mode not in ("txt2img", "img2img"):
            raise CapabilityError("mode", f"mode must be txt2img or img2img, got {r.mode!r}")
        if r.mode == "img2img" and not self.img2img:
            raise CapabilityError("mode", "img2img is not available: no VAE encoder model is loaded")
        if r.script_name:
            raise CapabilityError("script_name", f"Script '{r.script_name}' not found")
        for name in r.alwayson_scripts:
            raise CapabilityError("alwayson_scripts", f"always on script {name} not found")
        if r.mask_given:
            raise CapabilityError("mask", "inpainting is not supported (mask given)")

    def _sampler(self, r: GenerationRequest, warnings: list[str]) -> tuple[str, str]:
        name = (r.sampler_name or "").strip()
        scheduler = (r.scheduler or "").strip()
        for option in (o for pair in A1111_SCHEDULERS for o in pair):
            if name.endswith(" " + option):
                name, scheduler = name[: -len(option) - 1].strip(), option
                break
        if name and name.lower() not in {SAMPLER_NAME.lower(), *SAMPLER_ALIASES}:
            self._deviate("sampler_name", "sampler_name", f"sampler_name '{r.sampler_name}' is not available",
                          f"ran {SAMPLER_NAME}", warnings,
                          supported=f"{SAMPLER_NAME} or its aliases {', '.join(SAMPLER_ALIASES)}")
        if scheduler and scheduler.lower() != SCHEDULER_NAME:
            self._deviate("scheduler", "scheduler", f"scheduler '{scheduler}' is not available",
                          f"ran the fixed LCM schedule ({SCHEDULER_NAME})", warnings)
        return SAMPLER_NAME, SCHEDULER_NAME

    def _size(self, r: GenerationRequest, warnings: list[str]) -> tuple[int, int]:
        w, h = self.image_size
        if (r.width is not None and r.width != w) or (r.height is not None and r.height != h):
            field = "width" if r.width is not None and r.width != w else "height"
            self._deviate("width", field, f"width x height {r.width or w}x{r.height or h} is not supported",
                          f"generated {w}x{h} (the compiled models' size)", warnings,
                          supported=f"{w}x{h}, the compiled models' size")
        return w, h

    def _steps(self, r: GenerationRequest, warnings: list[str]) -> int:
        if r.steps is None:
            return self.default_steps
        if 1 <= r.steps <= self.max_steps:
            return r.steps
        clamped = min(max(r.steps, 1), self.max_steps)
        self._deviate("steps", "steps", f"steps {r.steps} is not supported (1–{self.max_steps})",
                      f"ran {clamped}", warnings)
        return clamped

    def _guidance(self, r: GenerationRequest, warnings: list[str]) -> float:
        cfg = 1.0 if r.cfg_scale is None else float(r.cfg_scale)
        if not self.guidance:
            if cfg > 1:
                warnings.append(f"cfg_scale {cfg:g} asks for guidance, but guidance=off: ran one UNet pass "
                                "per step (cfg 1)")
            cfg = 1.0
        elif cfg > self.max_cfg_scale:
            self._deviate("cfg_scale", "cfg_scale", f"cfg_scale {cfg:g} is above the maximum "
                          f"{self.max_cfg_scale:g}", f"ran {self.max_cfg_scale:g}", warnings)
            cfg = self.max_cfg_scale
        if cfg <= 1 and r.negative_prompt.strip():
            warnings.append("negative_prompt has no effect at cfg_scale ≤ 1 (one UNet pass per step)")
        return cfg

    def _subseed_strength(self, r: GenerationRequest, warnings: list[str]) -> float:
        strength = float(r.subseed_strength or 0.0)
        if not 0 <= strength <= 1:
            clamped = min(max(strength, 0.0), 1.0)
            self._deviate("subseed_strength", "subseed_strength",
                          f"subseed_strength {strength:g} is outside [0, 1]", f"ran {clamped:g}", warnings)
            strength = clamped
        return strength

    def _image_count(self, r: GenerationRequest, warnings: list[str]) -> tuple[int, int]:
        batch, n_iter = r.batch_size, r.n_iter
        if batch < 1 or n_iter < 1:
            self._deviate("batch_size", "batch_size" if batch < 1 else "n_iter",
                          f"batch_size {batch} × n_iter {n_iter}: both must be ≥ 1", "ran at least 1",
                          warnings)
            batch, n_iter = max(batch, 1), max(n_iter, 1)
        limit = self.max_images_per_request
        if batch * n_iter > limit:
            new_batch = min(batch, limit)
            new_iter = max(1, min(n_iter, limit // new_batch))
            self._deviate("batch_size", "batch_size" if batch > limit else "n_iter",
                          f"batch_size {batch} × n_iter {n_iter} = {batch * n_iter} images is above "
                          f"max_images_per_request {limit}", f"ran {new_batch} × {new_iter}", warnings)
            batch, n_iter = new_batch, new_iter
        return batch, n_iter

    def _img2img(self, r: GenerationRequest, warnings: list[str]) -> tuple[float, int]:
        """(denoising strength, resize mode); txt2img denoises everything (1.0)."""
        if r.mode != "img2img":
            return 1.0, 0
        strength = DEFAULT_DENOISING_STRENGTH if r.denoising_strength is None else float(r.denoising_strength)
        if not MIN_DENOISING_STRENGTH <= strength <= 1:
            clamped = min(max(strength, MIN_DENOISING_STRENGTH), 1.0)
            self._deviate("denoising_strength", "denoising_strength",
                          f"denoising_strength {strength:g} is outside (0, 1]", f"ran {clamped:g}", warnings)
            strength = clamped
        if r.resize_mode == 3:
            warnings.append("resize_mode 3 (resize in latent space) is not supported; ran 0 (just resize)")
            return strength, 0
        if r.resize_mode not in RESIZE_MODES:
            raise CapabilityError("resize_mode", f"resize_mode must be 0, 1, 2 or 3, got {r.resize_mode}")
        return strength, r.resize_mode

    @staticmethod
    def _images(
        r: GenerationRequest, count: int, variation: bool, resize_mode: int, size: tuple[int, int]
    ) -> tuple[ImagePlan, ...]:
        """Seeds as A1111 (seed+i, or seed for all with a variation strength; subseed+i) and the init
        images resized to the model size, cycled over the batch."""
        seed = fixed_seed(parse_seed(r.seed, "seed"))
        subseed = fixed_seed(parse_seed(r.subseed, "subseed"))
        inits: list[Image.Image | None] = [None]
        if r.mode == "img2img" and r.init_images:
            inits = [resize_image(img, resize_mode, *size) for img in r.init_images]
        batch = max(r.batch_size, 1)
        return tuple(
            ImagePlan(seed=seed if variation else seed + i, subseed=subseed + i,
                      init_image=inits[(i % batch) % len(inits)])
            for i in range(count)
        )

    def _unsupported(self, r: GenerationRequest, warnings: list[str]) -> None:
        sent = r.unsupported
        for flag, what in (("enable_hr", "hires fix"), ("restore_faces", "face restoration"),
                           ("tiling", "tiling")):
            if sent.get(flag):
                warnings.append(f"{flag}: {what} is not supported; ignored")
        styles = [s for s in sent.get("styles") or [] if str(s).strip().lower() not in NO_STYLE_NAMES]
        if styles:  # AIYA sends ["None"] for "no style"; A1111 maps unknown names to no style too
            warnings.append(f"styles {styles} are not supported (none installed); ignored")
        clip_skip = sent.get("clip_skip")
        if isinstance(clip_skip, (int, float)) and clip_skip > 1:
            warnings.append(f"clip_skip {clip_skip:g} is not supported; ran 1")
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            value = sent.get(name)
            if isinstance(value, (int, float)) and value > 0:
                warnings.append(f"{name} {value:g} is not supported; ignored")

    def _options(
        self, r: GenerationRequest, options: OptionsStore | Mapping[str, Any] | None, warnings: list[str]
    ) -> dict[str, Any]:
        """The options in effect for this request: the defaults, the store, then `override_settings`."""
        effective: dict[str, Any] = dict(WRITABLE_DEFAULTS)
        if options is not None:
            effective.update(options if isinstance(options, Mapping) else options.as_dict())
        for key, value in r.override_settings.items():
            if not known_option(key):
                warnings.append(f"override_settings: unknown option '{key}' ignored")
                continue
            value, problem = _checked_override(key, value, options)
            if problem:
                warnings.append(f"override_settings: {problem}")
                continue
            effective[key] = value
        return effective


def parse_seed(value: Any, field_name: str = "seed") -> int:
    """-1/None/"" -> -1; an integer (or integral float / numeric string) -> int; else CapabilityError."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return -1
    if isinstance(value, bool):
        raise CapabilityError(field_name, f"{field_name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise CapabilityError(field_name, f"{field_name} must be an integer, got {value!r}")


def fixed_seed(seed: int) -> int:
    """A negative seed draws a random one in [0, 2^32); others are used as sent (A1111: seed+i, no wrap)."""
    return secrets.randbelow(SEED_RANGE) if seed < 0 else seed


def _checked_override(
    key: str, value: Any, options: OptionsStore | Mapping[str, Any] | None
) -> tuple[Any, str | None]:
    """(the value to use, None) for an override that applies, else (value, why it is ignored).

    Writable options are checked exactly as POST /sdapi/v1/options checks them."""
    if key == "CLIP_stop_at_last_layers" and isinstance(value, (int, float)) and value > 1:
        return value, f"CLIP_stop_at_last_layers {value:g} (clip skip) is not supported; ran 1"
    if key == "sd_model_checkpoint":
        if isinstance(options, OptionsStore) and options.resolve_checkpoint(value) is None:
            return value, f"sd_model_checkpoint '{value}' is not the loaded model; ignored"
        return value, None
    if key in WRITABLE_DEFAULTS:
        try:
            return validate_option(key, value), None
        except RequestError as exc:
            return value, f"{exc.message}; ignored"
    return value, None
