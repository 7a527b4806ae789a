"""The one error map (api/errors.py): service errors and stage failures, shaped by route family."""

from __future__ import annotations

import json

import pytest

from pi_axera_sd_service.api import errors
from pi_axera_sd_service.pipeline.stages import StageError
from pi_axera_sd_service.service.errors import CapabilityError, QueueFullError, RequestError


def body_of(path: str, exc: Exception) -> tuple[int, dict, dict]:
    err = errors.describe(exc)
    assert err is not None
    response = errors.error_response(path, err)
    return response.status_code, json.loads(response.body), dict(response.headers)


def test_each_family_shapes_the_same_error() -> None:
    rejected = CapabilityError("steps", "steps 9 is not supported (1–4); ran 4 (strict mode)")
    status, body, _ = body_of("/sdapi/v1/txt2img", rejected)
    assert status == 422 and body["error"] == "HTTPException" and body["detail"] == rejected.message
    status, body, _ = body_of("/generate", rejected)  # upstream: every client error is a 400
    assert (status, body) == (400, {"status": "error", "error": rejected.message})
    status, body, headers = body_of("/generate", QueueFullError("queue is full", retry_after=7))
    assert status == 503 and headers["retry-after"] == "7" and body["error"] == "queue is full"
    status, body, _ = body_of("/sdapi/v1/img2img", StageError("unet", "axclrt run failed"))
    assert status == 500 and body["error"] == "StageError" and "unet" in body["detail"]
    assert errors.describe(RuntimeError("boom")) is None  # a server fault: the middleware's 500


def test_a_new_family_gets_its_own_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook a later /v1/* (OpenAI) family uses: `{"error": {...}}` for its paths only."""
    monkeypatch.setattr(errors, "_FAMILIES", list(errors._FAMILIES))

    def openai_shape(err: errors.ApiError) -> tuple[int, dict]:
        return err.status_code, {"error": {"message": err.message, "type": err.error, "code": None}}

    errors.add_error_family(lambda path: path.startswith("/v1/"), openai_shape)
    status, body, _ = body_of("/v1/images/generations", RequestError("prompt", "prompt is required"))
    assert status == 400 and body == {"error": {"message": "prompt is required", "type": "HTTPException",
                                                "code": None}}
    assert body_of("/generate", RequestError("prompt", "prompt is required"))[1]["status"] == "error"
    fault = errors.server_fault_body("/v1/images/generations", RuntimeError())
    assert fault["error"]["type"] == "RuntimeError"
