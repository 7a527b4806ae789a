"""POST /generate: the upstream service's route (picker, pi_axera_sd_interactive).

Every client error is a 400 `{"status": "error", "error": "<message naming the field>"}` as the
upstream service answered; only server faults are 5xx (503 with Retry-After for queue/device).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ...service.engine import Engine
from ...service.request import from_generate
from ..errors import generate_error, generate_error_for
from ..protocol import GenerateRequest, GenerateResponse

router = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


# The body is parsed by hand (upstream's 400s), so its schema is given to the docs explicitly.
@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True, openapi_extra={
    "requestBody": {"required": True,
                    "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}}}})
async def generate(request: Request) -> Any:
    """txt2img or img2img through the one GenerationRequest; PNG images as raw base64."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return generate_error(400, "the request body must be a JSON object")
    if not isinstance(body, dict):
        return generate_error(400, "the request body must be a JSON object")
    try:
        payload = GenerateRequest.model_validate(body)
    except ValidationError as exc:
        return generate_error(400, _validation_message(exc))

    engine = _engine(request)
    try:
        result, encoded = await engine.generate(
            lambda: from_generate(payload.model_dump(), payload.model_fields_set, engine.settings),
            request.is_disconnected,
        )
    except Exception as exc:  # the expected ones become responses; others go to the app's handlers
        response = generate_error_for(exc)
        if response is None:
            raise
        return response

    seeds = list(result.seeds)
    body_out: dict[str, Any] = {
        "status": "ok",
        "base64": encoded.images_b64[0] if encoded.images_b64 else None,
        "images": encoded.images_b64,
        "seed": seeds[0] if seeds else (result.request.all_seeds[0] if result.request.all_seeds else None),
        "seeds": seeds,
        "text_time_ms": round(result.text_time_ms, 1),
        "total_time_ms": round(result.total_time_ms, 1),
        "warnings": list(result.warnings),
    }
    if encoded.paths:
        body_out["path"] = str(encoded.paths[0])
    return JSONResponse(body_out)
