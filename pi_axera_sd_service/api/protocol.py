"""Pydantic request/response models of the HTTP API, kept apart from the handlers.

The /sdapi models follow A1111's generated models (`modules/api/models.py`): every field Optional,
nulls accepted, unknown keys ignored, A1111's defaults (the response echoes them). What the
service actually runs is decided later by the capability table, not by these defaults.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..service.capabilities import DEFAULT_DENOISING_STRENGTH


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------- /generate
class GenerateRequest(_Lenient):
    """POST /generate (the upstream seed contract). `mode` and `prompt` are checked by the translation."""

    mode: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    init_image: str | None = None
    init_images: list[str] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: Any = -1
    sampler_name: str | None = None
    cfg_scale: float | None = None
    n_iter: int | None = None
    batch_size: int | None = None
    denoising_strength: float | None = None
    strength: float | None = None
    resize_mode: int | None = None
    task_id: str | None = None
    return_images: bool | None = None   # true: `images` also for a single image


class GenerateResponse(BaseModel):
    """`base64` is the first image (the seed contract); `images` (all of them) only when there are
    several or the request set `return_images`, so one picture is not sent twice."""

    status: str = "ok"
    base64: str | None
    images: list[str] | None = None
    seed: int | None
    seeds: list[int]
    text_time_ms: float
    total_time_ms: float
    warnings: list[str]
    path: str | None = None


# ---------------------------------------------------------------------------- /sdapi/v1 generation
class _ProcessingFields(_Lenient):
    """Fields of A1111's StableDiffusionProcessing plus the API-only ones."""

    prompt: str | list[str] | None = ""
    negative_prompt: str | list[str] | None = ""
    styles: list[str] | None = None
    seed: Any = -1
    subseed: Any = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    clip_skip: int | None = None  # SD.Next; SillyTavern sends it
    # API-only fields
    sampler_index: str | None = "Euler"
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_ProcessingFields):
    """POST /sdapi/v1/txt2img (A1111 StableDiffusionTxt2ImgProcessingAPI)."""

    denoising_strength: float | None = None
    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(_ProcessingFields):
    """POST /sdapi/v1/img2img (A1111 StableDiffusionImg2ImgProcessingAPI)."""

    init_images: list[Any] | None = None
    resize_mode: int | None = 0
    denoising_strength: float | None = DEFAULT_DENOISING_STRENGTH
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = Field(False, exclude=True)


class ImageResponse(BaseModel):
    """TextToImageResponse / ImageToImageResponse."""

    images: list[str] | None
    parameters: dict[str, Any]
    info: str


# ---------------------------------------------------------------------------- lists and info
class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, Any]
    skipped: dict[str, Any]


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class PNGInfoRequest(_Lenient):
    image: str = ""


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


# ---------------------------------------------------------------------------- interrogate
class InterrogateRequest(_Lenient):
    """A1111's `{image, model}` (image: raw base64 or a data URI; model: `clip`, the one served)."""

    image: Any = None
    model: Any = "clip"


class TagScoreItem(BaseModel):
    tag: str
    score: float


class InterrogateResponse(BaseModel):
    """A1111's `{caption}` plus the upstream service's scored tags; `tags_complete: false` and
    `tags_prepared: "ready/total"` only while the tag-list embeddings are still being built."""

    caption: str
    interrogations: list[TagScoreItem]
    tags_complete: bool | None = None
    tags_prepared: str | None = None


class StructuredInterrogateRequest(_Lenient):
    """The upstream service's `{image, categories: {name: [labels]}}`."""

    image: Any = None
    categories: Any = None


class CategoryWinner(BaseModel):
    winner: str
    confidence: float


class StructuredInterrogateResponse(BaseModel):
    """Winner and softmax confidence per category, and the general tags of the tag list."""

    results: dict[str, CategoryWinner]
    general_tags: list[str]
    tags_complete: bool | None = None
    tags_prepared: str | None = None
