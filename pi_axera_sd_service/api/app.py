"""The FastAPI app factory: lifespan (engine start/stop), routers, middlewares, error handlers."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from ..pipeline.prompt_parser import PromptError
from ..pipeline.stages import StageError
from ..service.engine import Engine
from ..service.errors import ServiceError
from ..settings import Settings
from .errors import ApiError, a1111_body, describe, error_response, in_added_family
from .middleware import AuthMiddleware, BodyLimitMiddleware, RequestLogMiddleware, Scope
from .routers import generate, internal, openai, sdapi, ui


def _route_label_for(app: FastAPI, routers: list[APIRouter]):
    """Metric/log label: the route template, so ids in paths never explode cardinality.

    Requests refused before routing (401, 413) have no `route` in their scope yet; they are matched
    against the routes themselves (a path match with any method counts)."""
    routes = [r for r in app.router.routes if isinstance(r, BaseRoute) and getattr(r, "path", None)]
    routes += [r for router in routers for r in router.routes]

    def label(scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        for candidate in routes:
            match, _ = candidate.matches(scope)
            if match != Match.NONE:
                return candidate.path
        return "unmatched"

    return label


def _is_sdapi(request: Request) -> bool:
    return request.url.path.startswith("/sdapi/")


def _install_error_handlers(app: FastAPI) -> None:
    async def service_error(request: Request, exc: Exception) -> Response:
        """Every service error and stage failure, once, in the shape of the route family."""
        err = describe(exc)
        assert err is not None
        return error_response(request.url.path, err)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if in_added_family(request.url.path):  # e.g. OpenAI clients read error.message, even on a 404
            err = ApiError(exc.status_code, str(exc.detail), "HTTPException", headers=dict(exc.headers or {}))
            return error_response(request.url.path, err)
        if _is_sdapi(request) and "route" in request.scope:  # unmatched paths keep {"detail": "Not Found"}
            body = a1111_body(exc.detail, "HTTPException", exc.status_code)
            return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
        return await http_exception_handler(request, exc)

    async def invalid_request(request: Request, exc: Exception) -> Response:
        """FastAPI's 422 body, with values JSON cannot carry (Infinity, NaN) echoed as strings."""
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    for expected in (ServiceError, StageError, PromptError):
        app.add_exception_handler(expected, service_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    # Any other exception: RequestLogMiddleware logs it and answers 500 (errors.server_fault_body).


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (which strict JSON cannot encode) by their text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _cors_kwargs(settings: Settings) -> dict[str, Any] | None:
    origins = [o.strip() for o in (settings.cors_allow_origins or "").split(",") if o.strip()]
    if not origins and not settings.cors_allow_origins_regex:
        return None
    return {"allow_origins": origins, "allow_origin_regex": settings.cors_allow_origins_regex,
            "allow_methods": ["*"], "allow_headers": ["*"], "allow_credentials": True}


def create_app(
    settings: Settings, engine: Engine | None = None, *, load_in_background: bool = False
) -> FastAPI:
    """The service app. The lifespan loads the models (unless the engine is already running).

    With `load_in_background` the server answers at once while the models load (≈15 s on the NPU):
    /health says "starting" (503), generation requests wait for the load (up to queue_timeout) and
    options answer 503 with Retry-After until ready (api/deps.py).
    """
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.started:
            if load_in_background:
                engine.start_in_background()
            else:
                await asyncio.to_thread(engine.start)  # model load off the event loop
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, settings.shutdown_timeout)

    # docs_url/redoc_url off: routers.ui serves both from vendored files (FastAPI's load from a CDN)
    app = FastAPI(title="pi_axera_sd_service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.engine = engine
    routers = [generate.router, sdapi.router, internal.router, openai.router, *ui.routers(settings)]
    for router in routers:
        app.include_router(router)
    _install_error_handlers(app)

    # add_middleware puts the last one outermost: log -> CORS -> auth -> body limit -> routes
    app.add_middleware(BodyLimitMiddleware, settings=settings, metrics=engine.metrics)
    if settings.api_auth or settings.api_keys:
        app.add_middleware(AuthMiddleware, settings=settings)
    cors = _cors_kwargs(settings)
    if cors is not None:
        app.add_middleware(CORSMiddleware, **cors)
    app.add_middleware(RequestLogMiddleware, settings=settings, metrics=engine.metrics,
                       route_label=_route_label_for(app, routers))
    return app
