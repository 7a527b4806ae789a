"""/internal/* (A1111's UI routes: ping, per-task progress, pending tasks), /health, /metrics,
/capabilities."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ...service.metrics import METRICS_CONTENT_TYPE
from ..deps import EngineDep, ReadyEngineDep

router = APIRouter()
HEALTHY = ("ok", "degraded")   # degraded: some device lost or not loaded, one at least serving


class TaskProgressRequest(BaseModel):
    """Body of POST /internal/progress (A1111 ProgressRequest)."""

    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


@router.get("/internal/ping")
async def ping() -> dict[str, Any]:
    return {}


@router.post("/internal/progress")
async def task_progress(body: TaskProgressRequest, engine: EngineDep) -> dict[str, Any]:
    return engine.task_progress(body.id_task or "", body.id_live_preview, body.live_preview)


@router.get("/internal/pending-tasks")
async def pending_tasks(engine: EngineDep) -> dict[str, Any]:
    tasks = engine.pending_tasks()
    return {"size": len(tasks), "tasks": tasks}


@router.get("/health")
async def health(engine: EngineDep) -> JSONResponse:
    body = engine.health()
    return JSONResponse(body, status_code=200 if body["status"] in HEALTHY else 503)


@router.get("/metrics")
async def metrics(engine: EngineDep) -> Response:
    return Response(engine.metrics_exposition(), media_type=METRICS_CONTENT_TYPE)


@router.get("/capabilities")
async def capabilities(engine: ReadyEngineDep) -> dict[str, Any]:
    return engine.capabilities_dict()
