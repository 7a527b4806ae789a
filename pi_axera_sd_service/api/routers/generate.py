"""POST /generate: the upstream service's route (picker, pi_axera_sd_interactive).

Every client error is a 400 `{"status": "error", "error": "<message naming the field>"}` as the
upstream service answered (api/errors.py maps them); only server faults are 5xx (503 with
Retry-After for queue/device).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request

from ...service.request import from_generate
from ..deps import GenerationEngineDep
from ..protocol import GenerateErrorBody, GenerateRequest, GenerateResponse, error_responses, validated

router = APIRouter(responses=error_responses(401))   # 401 only with api_auth


async def _payload(request: Request) -> GenerateRequest:
    """The body as the route payload; RequestError (400) when it is not a valid JSON object."""
    try:
        body: Any = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    return validated(GenerateRequest, body)


# The body is parsed by hand (upstream's 400s), so its schema is given to the docs explicitly.
# 408/413 come from the body check in the middleware, in the /generate shape too.
GENERATE_ERRORS = error_responses(400, 408, 413, 500, 503, model=GenerateErrorBody)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_unset=True,
             responses=GENERATE_ERRORS, openapi_extra={
    "requestBody": {"required": True,
                    "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}}}})
async def generate(request: Request, engine: GenerationEngineDep) -> GenerateResponse:
    """txt2img or img2img through the one GenerationRequest; PNG images as raw base64.

    `base64` carries the first image; `images` (every image) is added only for several images or
    when `return_images` is true, so one image is not sent twice."""
    payload = await _payload(request)
    result, encoded = await engine.generate(
        lambda: from_generate(payload.model_dump(), payload.model_fields_set, engine.settings),
        request.is_disconnected,
    )
    seeds, images = list(result.seeds), encoded.images_b64
    response = GenerateResponse(
        status="ok", base64=images[0] if images else None,
        seed=seeds[0] if seeds else result.plan.seed, seeds=seeds,
        text_time_ms=round(result.text_time_ms, 1), total_time_ms=round(result.total_time_ms, 1),
        warnings=list(result.warnings),
    )
    if len(images) > 1 or payload.return_images:
        response.images = images
    if encoded.paths:
        response.path = str(encoded.paths[0])
    return response
