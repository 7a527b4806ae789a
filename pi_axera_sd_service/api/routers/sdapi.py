"""/sdapi/v1/*: A1111 generation routes plus discovery and control, with truthful fixed values.

Errors use A1111's body `{error, detail, body, errors}`; request-schema violations keep FastAPI's
422 `{"detail": [...]}`. An undecodable image is a 400 (A1111 answers 500).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from ...service.capabilities import SAMPLER_ALIASES, SAMPLER_NAME
from ...service.engine import Engine
from ...service.infotext import png_info
from ...service.request import GenerationRequest, RequestError, from_sdapi
from ...service.results import sdapi_parameters
from ..errors import a1111_error, sdapi_error_for
from ..protocol import (
    EmbeddingsResponse,
    ImageResponse,
    Img2ImgRequest,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
    Txt2ImgRequest,
    UpscalerItem,
)

router = APIRouter(prefix="/sdapi/v1")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _engine(request: Request) -> Engine:
    return request.app.state.engine


# ---------------------------------------------------------------------------- generation
async def _generate(mode: str, payload: Txt2ImgRequest | Img2ImgRequest, request: Request) -> JSONResponse:
    engine = _engine(request)

    def translate() -> GenerationRequest:
        return from_sdapi(mode, payload.model_dump(), payload.model_fields_set, engine.settings)

    try:
        _, encoded = await engine.generate(translate, request.is_disconnected)
    except Exception as exc:  # expected errors become A1111 bodies; others go to the app's handlers
        response = sdapi_error_for(exc)
        if response is None:
            raise
        return response
    include = isinstance(payload, Img2ImgRequest) and bool(payload.include_init_images)
    body = {
        "images": encoded.images_b64,
        "parameters": sdapi_parameters(payload.model_dump(), include_init_images=include),
        "info": json.dumps(encoded.info, ensure_ascii=False),
    }
    return JSONResponse(body)


@router.post("/txt2img", response_model=ImageResponse)
async def txt2img(payload: Txt2ImgRequest, request: Request) -> Any:
    return await _generate("txt2img", payload, request)


@router.post("/img2img", response_model=ImageResponse)
async def img2img(payload: Img2ImgRequest, request: Request) -> Any:
    return await _generate("img2img", payload, request)


# ---------------------------------------------------------------------------- progress and control
@router.get("/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False) -> Any:
    return _engine(request).progress.snapshot(skip_current_image)


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    _engine(request).interrupt()
    return {}


@router.post("/skip")
async def skip(request: Request) -> None:
    _engine(request).skip()
    return None


# ---------------------------------------------------------------------------- options
@router.get("/options")
async def get_options(request: Request) -> Any:
    engine = _engine(request)
    if engine.options is None:
        return a1111_error(503, "Models are still loading", "NotReadyError", {"Retry-After": "5"})
    return engine.options.as_dict()


@router.post("/options")
async def set_options(request: Request, changes: dict[str, Any] = Body(...)) -> Any:  # noqa: B008
    """Accepts the whole GET dict back; unknown and read-only keys are ignored; returns null."""
    engine = _engine(request)
    if engine.options is None:
        return a1111_error(503, "Models are still loading", "NotReadyError", {"Retry-After": "5"})
    try:
        await asyncio.to_thread(engine.options.update, changes)
    except RequestError as exc:
        return a1111_error(exc.status_code, exc.message)
    return None


@router.get("/cmd-flags")
async def cmd_flags(request: Request) -> dict[str, Any]:
    """A fixed, truthful subset of A1111's flags (the api_auth secret is never shown)."""
    settings = _engine(request).settings
    return {
        "api": True, "nowebui": True, "listen": settings.host not in LOCAL_HOSTS,
        "server_name": settings.host, "port": settings.port,
        "api_auth": "<set>" if settings.api_auth else None, "api_log": True, "api_server_stop": False,
        "cors_allow_origins": settings.cors_allow_origins,
        "cors_allow_origins_regex": settings.cors_allow_origins_regex,
        "skip_torch_cuda_test": True, "use_cpu": [], "lowvram": False, "medvram": False,
    }


# ---------------------------------------------------------------------------- lists
@router.get("/sd-models", response_model=list[SDModelItem])
async def sd_models(request: Request) -> Any:
    options = _engine(request).options
    return [options.checkpoint.sd_models_item()] if options and options.checkpoint else []


@router.get("/samplers", response_model=list[SamplerItem])
async def samplers() -> Any:
    return [{"name": SAMPLER_NAME, "aliases": list(SAMPLER_ALIASES), "options": {}}]


@router.get("/schedulers", response_model=list[SchedulerItem])
async def schedulers() -> Any:
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
             "need_inner_model": False}]


@router.get("/upscalers", response_model=list[UpscalerItem])
async def upscalers() -> Any:
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


def _empty_list_route(path: str) -> None:
    async def empty() -> list[Any]:
        return []

    router.add_api_route(path, empty, methods=["GET"], name=path.strip("/").replace("-", "_"))


for _path in ("/latent-upscale-modes", "/sd-vae", "/loras", "/hypernetworks", "/face-restorers",
              "/realesrgan-models", "/prompt-styles", "/script-info", "/extensions"):
    _empty_list_route(_path)


@router.get("/embeddings", response_model=EmbeddingsResponse)
async def embeddings() -> Any:
    return {"loaded": {}, "skipped": {}}


@router.get("/scripts", response_model=ScriptsList)
async def scripts() -> Any:
    return {"txt2img": [], "img2img": []}


@router.get("/memory")
async def memory() -> dict[str, Any]:
    return {"ram": _ram(), "cuda": {"error": "unavailable"}}


def _ram() -> dict[str, Any]:
    """Real RAM figures in bytes: /proc/meminfo (MemAvailable counts as free), else sysconf."""
    try:
        fields = {}
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        total = fields["MemTotal"]
        free = fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, KeyError, ValueError, IndexError):
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = os.sysconf("SC_PHYS_PAGES") * page
            free = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError, AttributeError) as exc:
            return {"error": str(exc)}
    return {"free": free, "used": total - free, "total": total}


def _null_route(path: str, value: Any) -> None:
    async def constant() -> Any:
        return value

    router.add_api_route(path, constant, methods=["POST"], name=path.strip("/").replace("-", "_"))


for _path in ("/refresh-checkpoints", "/refresh-vae", "/refresh-loras", "/refresh-embeddings"):
    _null_route(_path, None)
for _path in ("/unload-checkpoint", "/reload-checkpoint"):
    _null_route(_path, {})


# ---------------------------------------------------------------------------- png-info
@router.post("/png-info", response_model=PNGInfoResponse)
async def png_info_route(payload: PNGInfoRequest) -> Any:
    try:
        return await asyncio.to_thread(png_info, payload.image)
    except RequestError as exc:
        return a1111_error(exc.status_code, exc.message)


# ---------------------------------------------------------------------------- interrogate
INTERROGATE_UNAVAILABLE = (
    "Image interrogation is not available: this service runs only the SD1.5-LCM generation models "
    "(no CLIP/DeepDanbooru models are loaded)"
)


@router.post("/interrogate")
async def interrogate() -> Any:
    """501 in A1111's error shape, as the upstream service answered without its CLIP models."""
    return a1111_error(501, INTERROGATE_UNAVAILABLE, "NotImplementedError")


@router.post("/interrogate/structured")
async def interrogate_structured() -> Any:
    """The upstream service's structured variant: also 501 (the picker falls back on any error)."""
    return a1111_error(501, INTERROGATE_UNAVAILABLE, "NotImplementedError")
