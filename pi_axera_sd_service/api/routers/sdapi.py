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

from ...service.capabilities import SAMPLER_ALIASES, SAMPLER_NAME
from ...service.errors import RequestError
from ...service.infotext import png_info
from ...service.interrogation import CLIP_MODEL
from ...service.request import GenerationRequest, from_sdapi
from ...service.results import sdapi_parameters
from ...settings import is_exposed
from ..deps import EngineDep, GenerationEngineDep, ReadyEngineDep
from ..protocol import (
    EmbeddingsResponse,
    ImageResponse,
    Img2ImgRequest,
    InterrogateRequest,
    InterrogateResponse,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
    StructuredInterrogateRequest,
    StructuredInterrogateResponse,
    Txt2ImgRequest,
    UpscalerItem,
    error_responses,
)

router = APIRouter(prefix="/sdapi/v1", responses=error_responses(401))   # 401 only with api_auth


# ---------------------------------------------------------------------------- generation
async def _generate(
    mode: str, payload: Txt2ImgRequest | Img2ImgRequest, request: Request, engine: EngineDep
) -> ImageResponse:
    def translate() -> GenerationRequest:
        return from_sdapi(mode, payload.model_dump(), payload.model_fields_set, engine.settings)

    _, encoded = await engine.generate(translate, request.is_disconnected)
    include = isinstance(payload, Img2ImgRequest) and bool(payload.include_init_images)
    return ImageResponse(
        images=encoded.images_b64,
        parameters=sdapi_parameters(payload.model_dump(), include_init_images=include),
        info=json.dumps(encoded.info, ensure_ascii=False),
    )


GENERATION_ERRORS = (400, 413, 422, 500, 503)


@router.post("/txt2img", response_model=ImageResponse, responses=error_responses(*GENERATION_ERRORS))
async def txt2img(payload: Txt2ImgRequest, request: Request, engine: GenerationEngineDep) -> ImageResponse:
    return await _generate("txt2img", payload, request, engine)


@router.post("/img2img", response_model=ImageResponse, responses=error_responses(404, *GENERATION_ERRORS))
async def img2img(payload: Img2ImgRequest, request: Request, engine: GenerationEngineDep) -> ImageResponse:
    return await _generate("img2img", payload, request, engine)


# ---------------------------------------------------------------------------- progress and control
@router.get("/progress", response_model=ProgressResponse)
async def progress(engine: EngineDep, skip_current_image: bool = False) -> Any:
    return engine.progress_snapshot(skip_current_image)


@router.post("/interrupt")
async def interrupt(engine: EngineDep) -> dict[str, Any]:
    engine.interrupt()
    return {}


@router.post("/skip")
async def skip(engine: EngineDep) -> None:
    engine.skip()
    return None


# ---------------------------------------------------------------------------- options
@router.get("/options", responses=error_responses(503))
async def get_options(engine: ReadyEngineDep) -> Any:
    return engine.get_options()


@router.post("/options", responses=error_responses(400, 413, 422, 500, 503))
async def set_options(engine: ReadyEngineDep, changes: dict[str, Any] = Body(...)) -> None:  # noqa: B008
    """Accepts the whole GET dict back; unknown and read-only keys are ignored; returns null."""
    await asyncio.to_thread(engine.set_options, changes)


@router.get("/cmd-flags")
async def cmd_flags(engine: EngineDep) -> dict[str, Any]:
    """A fixed, truthful subset of A1111's flags (the api_auth secret is never shown)."""
    settings = engine.settings
    return {
        "api": True, "nowebui": True, "listen": is_exposed(settings.host),
        "server_name": settings.host, "port": settings.port,
        "api_auth": "<set>" if settings.api_auth else None, "api_log": True, "api_server_stop": False,
        "cors_allow_origins": settings.cors_allow_origins,
        "cors_allow_origins_regex": settings.cors_allow_origins_regex,
        "skip_torch_cuda_test": True, "use_cpu": [], "lowvram": False, "medvram": False,
    }


# ---------------------------------------------------------------------------- lists
@router.get("/sd-models", response_model=list[SDModelItem])
async def sd_models(engine: EngineDep) -> Any:
    return engine.sd_models()


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
@router.post("/png-info", response_model=PNGInfoResponse, responses=error_responses(400, 413, 422))
async def png_info_route(payload: PNGInfoRequest) -> Any:
    return await asyncio.to_thread(png_info, payload.image)


# ---------------------------------------------------------------------------- interrogate
@router.post("/interrogate", response_model=InterrogateResponse, response_model_exclude_unset=True,
             responses=error_responses(400, 404, 413, 500, 501, 503))
async def interrogate(payload: InterrogateRequest, request: Request, engine: EngineDep) -> Any:
    """CLIP tags of the image on the NPU worker: A1111's `{caption}` plus `interrogations`.

    A1111's 404s for a missing image and a model other than `clip` (deepdanbooru is not served);
    501 when no CLIP models are loaded; 400 for an undecodable image."""
    if payload.image is not None and payload.image != "" and payload.model != CLIP_MODEL:
        raise RequestError("model", "Model not found", status_code=404)
    return await engine.interrogate(payload.image, is_disconnected=request.is_disconnected)


@router.post("/interrogate/structured", response_model=StructuredInterrogateResponse,
             response_model_exclude_unset=True, responses=error_responses(400, 404, 413, 500, 501, 503))
async def interrogate_structured(payload: StructuredInterrogateRequest, request: Request,
                                 engine: EngineDep) -> Any:
    """The upstream service's category route: winner and confidence per category, general tags;
    400 naming the limit when the categories exceed one."""
    return await engine.interrogate(payload.image, payload.categories, structured=True,
                                    is_disconnected=request.is_disconnected)
