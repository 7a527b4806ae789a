"""/v1/*: the OpenAI images API (generations, edits, models) over the one GenerationRequest.

Every error under /v1/ is OpenAI's body `{"error": {message, type, param, code}}`: the shape is
registered once here as an error family (api/errors.py), so service errors, body refusals (413,
408, 400), 401s, 404/405 and 500s all come out in it. Client errors are 400 naming the OpenAI
field in `param`; 503 keeps Retry-After. Our warnings, seeds and the model that ran go in the
documented extra field `pi_axera_sd`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.datastructures import UploadFile

from ...service.engine import Engine
from ...service.errors import RequestError
from ...service.openai_request import from_openai
from ...service.request import GenerationRequest
from ..deps import GenerationEngineDep, ReadyEngineDep
from ..errors import ApiError, add_error_family
from ..middleware import parsed_json_body
from ..openai_protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    OpenAIErrorBody,
    openai_error_body,
)
from ..protocol import error_responses, validated

PREFIX = "/v1"
# 401 only with api_auth/api_keys; 408/413 from the body check; all in OpenAI's shape
router = APIRouter(prefix=PREFIX,
                   responses=error_responses(400, 401, 408, 413, 500, 503, model=OpenAIErrorBody))
OWNER = "pi_axera_sd_service"
IMAGE_FIELDS = ("image", "image[]")
MAX_UPLOADS = 16
# Internal field names (RequestError.field) -> the OpenAI parameter a client sent (None: the body).
OPENAI_PARAMS: dict[str, str | None] = {
    "batch_size": "n", "n_iter": "n", "width": "size", "height": "size", "denoising_strength": "strength",
    "samples_format": "output_format", "jpeg_quality": "output_compression", "init_images": "image",
    "body": None,
}


def openai_param(field: str | None) -> str | None:
    """The OpenAI parameter a client sent for an internal field or a body path (`image[1]` -> image)."""
    if field is None or field in OPENAI_PARAMS:
        return OPENAI_PARAMS.get(field or "body")
    return re.split(r"[.\[]", field, maxsplit=1)[0]


def openai_shape(err: ApiError) -> tuple[int, dict[str, Any]]:
    """OpenAI's error family: every client error a 400 naming the OpenAI `param` (code
    `unsupported_value` for a capability rejection, else `invalid_value`); body refusals keep their
    status (400, 408, 413); 401 `invalid_api_key`; server faults keep their status with the error's
    name as `code`."""
    if err.client_error:
        code = "unsupported_value" if err.status_code == 422 else "invalid_value"  # 422: CapabilityError
        return 400, openai_error_body(400, err.message, openai_param(err.field), code)
    code = "invalid_api_key" if err.status_code == 401 else err.error if err.status_code >= 500 else None
    message = err.message or f"internal server error ({err.error})"
    return err.status_code, openai_error_body(err.status_code, message, openai_param(err.field), code)


add_error_family(lambda path: path.startswith(PREFIX + "/"), openai_shape)


# ---------------------------------------------------------------------------- images
async def _images(
    request: Request, engine: Engine, mode: str, payload: ImageGenerationRequest,
    images: list[bytes | str],
) -> dict[str, Any]:
    def translate() -> GenerationRequest:
        return from_openai(mode, payload.model_dump(), payload.model_fields_set, engine.settings,
                           unknown=sorted(payload.model_extra or {}), images=images)

    result, encoded = await engine.generate(translate, request.is_disconnected)
    plan = result.plan
    body = ImagesResponse(
        created=int(time.time()),
        data=[{"b64_json": b64} for b64 in encoded.images_b64],
        output_format=plan.samples_format,
        size=f"{plan.width}x{plan.height}",
        pi_axera_sd={"model": encoded.info.get("sd_model_name"), "seeds": list(result.seeds),
                     "warnings": list(result.warnings), "infotexts": list(encoded.infotexts)},
    )
    return body.model_dump(exclude_none=True)


# The bodies are read by hand (400s in OpenAI's shape), so their schemas are given to the docs.
def _request_body(content_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {content_type: {"schema": schema}}}}


@router.post("/images/generations", response_model=ImagesResponse,
             openapi_extra=_request_body("application/json", ImageGenerationRequest.model_json_schema()))
async def generations(request: Request, engine: GenerationEngineDep) -> Any:
    """txt2img. JSON body as OpenAI's; SD extras: negative_prompt, seed, steps, cfg_scale."""
    payload = validated(ImageGenerationRequest, parsed_json_body(request.scope))
    return await _images(request, engine, "txt2img", payload, [])


@router.post("/images/edits", response_model=ImagesResponse,
             openapi_extra=_request_body("multipart/form-data", ImageEditRequest.model_json_schema()))
async def edits(request: Request, engine: GenerationEngineDep) -> Any:
    """img2img. multipart/form-data as the SDKs send it: `image` (or `image[]`) files, `prompt`, ...;
    extra field `strength` (default: the capability table's img2img default). A `mask` is a 400."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise RequestError("image", "POST /v1/images/edits takes multipart/form-data with the image as a "
                           "file (as the openai SDK sends it)")
    fields, images = await _read_form(request)
    payload = validated(ImageEditRequest, fields)
    return await _images(request, engine, "img2img", payload, images)


async def _read_form(request: Request) -> tuple[dict[str, Any], list[bytes | str]]:
    """(text fields, the image uploads as bytes or base64 text); a mask file is noted by its name."""
    fields: dict[str, Any] = {}
    images: list[bytes | str] = []
    try:
        async with request.form(max_files=MAX_UPLOADS, max_fields=100) as form:
            for key, value in form.multi_items():
                if key in IMAGE_FIELDS:
                    images.append(await value.read() if isinstance(value, UploadFile) else value)
                elif isinstance(value, UploadFile):
                    fields[key] = value.filename or key
                else:
                    fields[key] = value
    except HTTPException as exc:  # Starlette's 400 for a malformed body or too many parts
        raise RequestError("body", f"malformed multipart body: {exc.detail}") from None
    return fields, images


# ---------------------------------------------------------------------------- models
def _model_card(engine: Engine) -> ModelCard:
    item = engine.sd_models()[0]  # ReadyEngineDep: the model is loaded
    try:
        created = int(Path(item["filename"]).stat().st_mtime)
    except OSError:
        created = 0
    return ModelCard(id=item["model_name"], created=created, owned_by=OWNER)


@router.get("/models", response_model=ModelList)
async def models(engine: ReadyEngineDep) -> Any:
    """The loaded model (OpenAI clients fill their model picker from it)."""
    return ModelList(data=[_model_card(engine)])


@router.get("/models/{model_id:path}", response_model=ModelCard,
            responses=error_responses(404, model=OpenAIErrorBody))
async def model(model_id: str, engine: ReadyEngineDep) -> Any:
    """The loaded model by any of its names (A1111 title, file name, model name, hash)."""
    card = _model_card(engine)
    if engine.options is None or engine.options.resolve_checkpoint(model_id) is None:
        raise HTTPException(404, f"The model '{model_id}' does not exist; this service has only '{card.id}'")
    return card
