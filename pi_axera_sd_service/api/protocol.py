"""Pydantic request/response models of the HTTP API, kept apart from the handlers.

The /sdapi models follow A1111's generated models (`modules/api/models.py`): every field Optional,
nulls accepted, unknown keys ignored, A1111's defaults (the response echoes them). What the
service actually runs is decided later by the capability table, not by these defaults.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

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


class GenerateResponse(BaseModel):
    status: str = "ok"
    base64: str | None
    images: list[str]
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


# ---------------------------------------------------------------------------- error bodies (OpenAPI)
class A1111ErrorBody(BaseModel):
    """A1111's error body (its `handle_exception`): every error of /sdapi, /capabilities, /internal,
    and the 401/413 the middlewares send on any route."""

    error: str = Field(description="the exception's name, e.g. HTTPException, NotReadyError")
    detail: Any = Field(description="the message for the client (a string)")
    body: Any = ""
    errors: str = Field(description='"<status>: <detail>"')


class GenerateErrorBody(BaseModel):
    """The upstream /generate error body: every client error is a 400, server faults keep their 5xx."""

    status: str = Field(description='always "error"')
    error: str


class FieldErrorsBody(BaseModel):
    """FastAPI's 422 for a body or query that does not fit the route's model."""

    detail: list[dict[str, Any]]


class HTTPErrorBody(BaseModel):
    """FastAPI's body for an HTTP error outside /sdapi (e.g. a body that is not JSON: 400)."""

    detail: Any


class UnprocessableBody(RootModel[A1111ErrorBody | FieldErrorsBody]):
    """A 422: the capability table refused a value (A1111's body), or the body does not fit the
    route's model (FastAPI's `{"detail": [...]}`)."""


class HealthBody(BaseModel):
    """GET /health: 200 with status "ok"; 503 with the same body otherwise (starting, load_failed,
    device_lost, worker_dead, shutting_down) and `detail` saying why."""

    status: str
    backend: str | None
    model: str | None
    queue_depth: int
    busy: bool
    uptime_s: float
    detail: str | None = None


ERROR_MEANINGS = {
    400: "A field value is invalid (the message names the field)",
    401: "Missing or wrong Basic credentials (only with api_auth)",
    404: "Init image not found (img2img without init_images)",
    413: "The body is larger than max_body_bytes",
    422: "The capability table refused a value, or the body does not fit the model",
    500: "A model stage failed, or the server's storage could not be written (the message says which)",
    501: "Not available with the loaded models",
    503: "Not ready, queue full or timed out, stopping, or the NPU is lost (Retry-After when known)",
}


def error_responses(*statuses: int, model: type[BaseModel] = A1111ErrorBody) -> dict[int | str, Any]:
    """`responses=` for a route: each status with its meaning and error body model."""
    return {status: {"model": UnprocessableBody if status == 422 else model,
                     "description": ERROR_MEANINGS[status]} for status in statuses}
