"""OpenAI images API: request/response models and the OpenAI error body (`/v1/*`).

Field names and shapes follow OpenAI's images API as the official SDKs send and read them. The SD
extras (`negative_prompt`, `seed`, `steps`, `cfg_scale`, and `strength` on edits) are ordinary
fields here; clients pass them through the SDKs' `extra_body`. Unknown fields are kept (`extra`)
so the translation can warn about them instead of failing the request. Numbers and prompts are
bounded as in protocol.py (`Int`, `Float`, `Prompt`), so a huge number or a broken prompt is a 400.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .protocol import Float, Int, Prompt


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations (JSON)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: Prompt
    model: str | None = None
    n: Int | None = None
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    output_compression: Int | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    stream: bool | None = None
    # SD extras
    negative_prompt: Prompt | None = None
    seed: Int | None = None
    steps: Int | None = None
    cfg_scale: Float | None = None


class ImageEditRequest(ImageGenerationRequest):
    """The non-file fields of POST /v1/images/edits (multipart); `image`/`mask` arrive as files."""

    strength: Float | None = None
    mask: str | None = None  # set to the uploaded file's name by the router: a mask is refused


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesExtra(BaseModel):
    """What this service adds to an images response, under `pi_axera_sd`."""

    model: str | None = Field(None, description="the loaded model that made the images")
    seeds: list[int] = Field(description="the seed of each image, in order")
    warnings: list[str] = Field(description="what was clamped or ignored (capability table)")
    infotexts: list[str] = Field(description="A1111 infotext of each image (also inside the file)")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    pi_axera_sd: ImagesExtra


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(None, description="the OpenAI request field at fault")
    code: str | None = Field(None, description="invalid_value, unsupported_value, invalid_api_key, "
                                               "or the 5xx cause")


class OpenAIErrorBody(BaseModel):
    """Every error under /v1/ (OpenAI's shape): client errors are 400s naming `param`."""

    error: OpenAIErrorDetail


def openai_error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body `{"error": {message, type, param, code}}`; `type` follows the status."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
