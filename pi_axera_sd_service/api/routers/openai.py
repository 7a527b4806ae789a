"""/v1/*: the OpenAI images API (generations, edits, models) over the one GenerationRequest.

Every error, request-schema violations included, is OpenAI's body `{"error": {message, type,
param, code}}`: client errors are 400 naming the OpenAI field in `param`; 503 keeps Retry-After.
Our warnings, seeds and the model that ran go in the documented extra field `pi_axera_sd`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from ...service.engine import Engine
from ...service.openai_request import from_openai
from ...service.request import CapabilityError, GenerationRequest, RequestError
from ..errors import classify
from ..openai_protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    openai_error_body,
)

router = APIRouter(prefix="/v1")
OWNER = "pi_axera_sd_service"
IMAGE_FIELDS = ("image", "image[]")
MAX_UPLOADS = 16
# Internal field names (in RequestError.field) -> the OpenAI parameter a client sent.
OPENAI_PARAMS = {"batch_size": "n", "n_iter": "n", "width": "size", "height": "size",
                 "denoising_strength": "strength", "samples_format": "output_format",
                 "jpeg_quality": "output_compression"}


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(openai_error_body(status, message, param, code), status_code=status, headers=headers)


def openai_error_for(exc: BaseException) -> JSONResponse | None:
    """The service's expected exceptions in OpenAI's shape (every client error a 400), else None."""
    found = classify(exc)
    if found is None:
        return None
    status, message, headers, name = found
    if isinstance(exc, RequestError):
        param = OPENAI_PARAMS.get(exc.field, exc.field.split("[")[0])
        code = "unsupported_value" if isinstance(exc, CapabilityError) else "invalid_value"
        return openai_error(400, message, param, code)
    return openai_error(status, message, None, name, headers or None)


def _validation_error(exc: ValidationError) -> JSONResponse:
    """A schema violation: 400 naming the first field, all problems in the message."""
    errors = exc.errors()
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}"
             for e in errors]
    param = str(errors[0]["loc"][0]) if errors and errors[0].get("loc") else None
    return openai_error(400, "; ".join(parts), param, "invalid_value")


def _engine(request: Request) -> Engine:
    return request.app.state.engine


# ---------------------------------------------------------------------------- images
async def _images(
    request: Request, mode: str, payload: ImageGenerationRequest, images: list[tuple[str, bytes | str]]
) -> JSONResponse:
    engine = _engine(request)

    def translate() -> GenerationRequest:
        return from_openai(mode, payload.model_dump(), payload.model_fields_set, engine.settings,
                           unknown=sorted(payload.model_extra or {}), images=images)

    try:
        result, encoded = await engine.generate(translate, request.is_disconnected)
    except Exception as exc:  # expected errors become OpenAI bodies; others go to the app's handlers
        response = openai_error_for(exc)
        if response is None:
            raise
        return response
    req = result.request
    checkpoint = engine.options.checkpoint if engine.options else None
    body = ImagesResponse(
        created=int(time.time()),
        data=[{"b64_json": b64} for b64 in encoded.images_b64],
        output_format=req.samples_format,
        size=f"{req.width}x{req.height}",
        pi_axera_sd={"model": checkpoint.model_name if checkpoint else None, "seeds": list(result.seeds),
                     "warnings": list(result.warnings), "infotexts": list(encoded.infotexts)},
    )
    return JSONResponse(body.model_dump(exclude_none=True))


@router.post("/images/generations", response_model=ImagesResponse)
async def generations(request: Request) -> Any:
    """txt2img. JSON body as OpenAI's; SD extras: negative_prompt, seed, steps, cfg_scale."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return openai_error(400, "the request body must be a JSON object", None, "invalid_json")
    if not isinstance(body, dict):
        return openai_error(400, "the request body must be a JSON object", None, "invalid_json")
    try:
        payload = ImageGenerationRequest.model_validate(body)
    except ValidationError as exc:
        return _validation_error(exc)
    return await _images(request, "txt2img", payload, [])


@router.post("/images/edits", response_model=ImagesResponse)
async def edits(request: Request) -> Any:
    """img2img. multipart/form-data as the SDKs send it: `image` (or `image[]`) files, `prompt`, ...;
    extra field `strength` (default 0.75 as /sdapi img2img). A `mask` is a 400 (no inpainting)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return openai_error(400, "POST /v1/images/edits takes multipart/form-data with the image as a file "
                            "(as the openai SDK sends it)", "image", "invalid_value")
    try:
        fields, images = await _read_form(request)
    except HTTPException as exc:  # Starlette's 400 for a malformed body or too many parts
        return openai_error(400, f"malformed multipart body: {exc.detail}", None, "invalid_value")
    try:
        payload = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        return _validation_error(exc)
    return await _images(request, "img2img", payload, images)


async def _read_form(request: Request) -> tuple[dict[str, Any], list[tuple[str, bytes | str]]]:
    """(text fields, [(name, bytes or base64 text)] of the image uploads); a mask file is noted by name."""
    fields: dict[str, Any] = {}
    images: list[tuple[str, bytes | str]] = []
    async with request.form(max_files=MAX_UPLOADS, max_fields=100) as form:
        for key, value in form.multi_items():
            if key in IMAGE_FIELDS:
                name = f"image[{len(images)}]"
                images.append((name, await value.read() if isinstance(value, UploadFile) else value))
            elif isinstance(value, UploadFile):
                fields[key] = value.filename or key
            else:
                fields[key] = value
    return fields, images


# ---------------------------------------------------------------------------- models
def _model_cards(engine: Engine) -> list[ModelCard]:
    checkpoint = engine.options.checkpoint if engine.options else None
    if checkpoint is None:
        return []
    try:
        created = int(Path(checkpoint.filename).stat().st_mtime)
    except OSError:
        created = 0
    return [ModelCard(id=checkpoint.model_name, created=created, owned_by=OWNER)]


def _not_ready() -> JSONResponse:
    return openai_error(503, "Models are still loading", None, "NotReadyError", {"Retry-After": "5"})


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> Any:
    """The loaded model (OpenAI clients fill their model picker from it)."""
    engine = _engine(request)
    if engine.options is None:
        return _not_ready()
    return _dump(ModelList(data=_model_cards(engine)))


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def model(model_id: str, request: Request) -> Any:
    """The loaded model by any of its names (A1111 title, file name, model name, hash)."""
    engine = _engine(request)
    if engine.options is None:
        return _not_ready()
    checkpoint = engine.options.checkpoint
    cards = _model_cards(engine)
    if not cards or checkpoint is None or model_id not in checkpoint.aliases:
        return openai_error(404, f"The model '{model_id}' does not exist; this service has only "
                            f"'{cards[0].id if cards else 'none'}'", "model", "model_not_found")
    return _dump(cards[0])


def _dump(model: BaseModel) -> JSONResponse:
    return JSONResponse(model.model_dump())
