"""/internal/* (A1111's UI routes: ping, per-task progress, pending tasks), /health, /metrics,
/capabilities."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ...service.engine import Engine
from ...service.metrics import METRICS_CONTENT_TYPE

router = APIRouter()


class TaskProgressRequest(BaseModel):
    """Body of POST /internal/progress (A1111 ProgressRequest)."""

    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


@router.get("/internal/ping")
async def ping() -> dict[str, Any]:
    return {}


@router.post("/internal/progress")
async def task_progress(body: TaskProgressRequest, request: Request) -> dict[str, Any]:
    return engine_of(request).task_progress(body.id_task or "", body.id_live_preview, body.live_preview)


@router.get("/internal/pending-tasks")
async def pending_tasks(request: Request) -> dict[str, Any]:
    tasks = engine_of(request).pending_tasks()
    return {"size": len(tasks), "tasks": tasks}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    body = engine_of(request).health()
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(engine_of(request).metrics.exposition(), media_type=METRICS_CONTENT_TYPE)


@router.get("/capabilities")
async def capabilities(request: Request) -> Any:
    engine = engine_of(request)
    if engine.capabilities is None:
        return JSONResponse({"detail": "models are still loading"}, status_code=503)
    return engine.capabilities.to_dict()
