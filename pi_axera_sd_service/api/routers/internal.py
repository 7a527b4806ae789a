"""/internal/* (A1111's UI routes: ping, per-task progress, pending tasks), /health, /metrics,
/capabilities."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ...service.metrics import METRICS_CONTENT_TYPE
from ..deps import EngineDep, ReadyEngineDep
from ..protocol import HealthBody, HTTPErrorBody, error_responses

router = APIRouter(responses=error_responses(401))   # api_auth (/health, /internal/ping: auth_health)
HEALTHY = ("ok", "degraded")   # degraded: some device lost or not loaded, one at least serving


class TaskProgressRequest(BaseModel):
    """Body of POST /internal/progress (A1111 ProgressRequest)."""

    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


@router.get("/internal/ping")
async def ping() -> dict[str, Any]:
    return {}


@router.post("/internal/progress", responses={**error_responses(400, model=HTTPErrorBody),
                                              **error_responses(413)})
async def task_progress(body: TaskProgressRequest, engine: EngineDep) -> dict[str, Any]:
    return engine.task_progress(body.id_task or "", body.id_live_preview, body.live_preview)


@router.get("/internal/pending-tasks")
async def pending_tasks(engine: EngineDep) -> dict[str, Any]:
    tasks = engine.pending_tasks()
    return {"size": len(tasks), "tasks": tasks}


@router.get("/health", responses={200: {"model": HealthBody, "description": "Ready"},
                                   503: {"model": HealthBody, "description": "Not ready: `status` says why"}})
async def health(engine: EngineDep) -> JSONResponse:
    body = engine.health()
    return JSONResponse(body, status_code=200 if body["status"] in HEALTHY else 503)


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "The Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(engine: EngineDep) -> Response:
    return Response(engine.metrics_exposition(), media_type=METRICS_CONTENT_TYPE)


@router.get("/capabilities", responses=error_responses(503))
async def capabilities(engine: ReadyEngineDep) -> dict[str, Any]:
    return engine.capabilities_dict()
