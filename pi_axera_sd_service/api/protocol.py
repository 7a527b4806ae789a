"""Pydantic request/response models of the HTTP API, kept apart from the handlers.

The /sdapi models follow A1111's generated models (`modules/api/models.py`): every field Optional,
nulls accepted, unknown keys ignored, A1111's defaults (the response echoes them). What the
service actually runs is decided later by the capability table, not by these defaults.

Every number a request may carry is bounded here (`Int`, `Float`: finite, in a range no field
needs to leave), and free-form values (`override_settings`, `script_args`, ...) pass the body
parser's checks (`FreeForm`), so no value can overflow, fail to serialize or recurse later.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, ValidationError, ValidationInfo

from ..pipeline.prompt_parser import check_prompt_text
from ..service.capabilities import DEFAULT_DENOISING_STRENGTH
from ..service.errors import RequestError
from .body import check_json_value

INT_LIMIT = 2**31 - 1     # sizes, steps, counts, modes: far beyond any clamp, far below float overflow
FLOAT_LIMIT = 1e9         # scales, strengths, sampler knobs


def _checked(value: Any) -> Any:
    """Free-form JSON: the body parser's depth, finiteness, range and Unicode checks (ValueError)."""
    check_json_value(value)
    return value


def _prompt_checked(value: Any, info: ValidationInfo) -> Any:
    """A prompt (or list of prompts) the pipeline will accept: valid Unicode, bounded nesting."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            check_prompt_text(text, info.field_name or "prompt")
    return value


Int = Annotated[int, Field(ge=-INT_LIMIT - 1, le=INT_LIMIT)]
Float = Annotated[float, Field(ge=-FLOAT_LIMIT, le=FLOAT_LIMIT, allow_inf_nan=False)]
FreeForm = Annotated[Any, AfterValidator(_checked)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_checked)]
JsonList = Annotated[list[Any], AfterValidator(_checked)]
Prompt = Annotated[str, AfterValidator(_prompt_checked)]


Model = TypeVar("Model", bound=BaseModel)


def validated(model: type[Model], body: Any) -> Model:
    """A body read by hand (routes that answer 400, not FastAPI's 422) as `model`: RequestError (400)
    when it is not a JSON object or breaks the schema (the field is the first one at fault, the
    message lists every problem)."""
    if not isinstance(body, dict):
        raise RequestError("body", "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}"
                 for e in errors]
        field = str(errors[0]["loc"][0]) if errors and errors[0].get("loc") else "body"
        raise RequestError(field, "; ".join(parts)) from None


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------- /generate
class GenerateRequest(_Lenient):
    """POST /generate (the upstream seed contract). `mode` and `prompt` are checked by the translation."""

    mode: str | None = None
    prompt: Prompt | None = None
    negative_prompt: Prompt | None = None
    init_image: str | None = None
    init_images: list[str] | None = None
    width: Int | None = None
    height: Int | None = None
    steps: Int | None = None
    seed: FreeForm = -1
    sampler_name: str | None = None
    cfg_scale: Float | None = None
    n_iter: Int | None = None
    batch_size: Int | None = None
    denoising_strength: Float | None = None
    strength: Float | None = None
    resize_mode: Int | None = None
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

    prompt: Prompt | list[Prompt] | None = ""
    negative_prompt: Prompt | list[Prompt] | None = ""
    styles: list[str] | None = None
    seed: FreeForm = -1
    subseed: FreeForm = -1
    subseed_strength: Float | None = 0
    seed_resize_from_h: Int | None = -1
    seed_resize_from_w: Int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: Int | None = 1
    n_iter: Int | None = 1
    steps: Int | None = 50
    cfg_scale: Float | None = 7.0
    width: Int | None = 512
    height: Int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: Float | None = None
    s_min_uncond: Float | None = None
    s_churn: Float | None = None
    s_tmax: Float | None = None
    s_tmin: Float | None = None
    s_noise: Float | None = None
    override_settings: JsonObject | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: Float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: JsonObject | None = None
    clip_skip: Int | None = None  # SD.Next; SillyTavern sends it
    # API-only fields
    sampler_index: str | None = "Euler"
    script_name: str | None = None
    script_args: JsonList | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: JsonObject | None = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_ProcessingFields):
    """POST /sdapi/v1/txt2img (A1111 StableDiffusionTxt2ImgProcessingAPI)."""

    denoising_strength: Float | None = None
    enable_hr: bool | None = False
    firstphase_width: Int | None = 0
    firstphase_height: Int | None = 0
    hr_scale: Float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: Int | None = 0
    hr_resize_x: Int | None = 0
    hr_resize_y: Int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(_ProcessingFields):
    """POST /sdapi/v1/img2img (A1111 StableDiffusionImg2ImgProcessingAPI)."""

    init_images: JsonList | None = None
    resize_mode: Int | None = 0
    denoising_strength: Float | None = DEFAULT_DENOISING_STRENGTH
    image_cfg_scale: Float | None = None
    mask: str | None = None
    mask_blur_x: Int | None = 4
    mask_blur_y: Int | None = 4
    mask_blur: Int | None = None
    mask_round: bool | None = True
    inpainting_fill: Int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: Int | None = 0
    inpainting_mask_invert: Int | None = 0
    initial_noise_multiplier: Float | None = None
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
    408: "The body did not arrive within body_timeout",
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
