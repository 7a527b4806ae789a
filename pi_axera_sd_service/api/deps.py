"""FastAPI dependencies: the engine of this app, and the engine once its models are loaded."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..service.engine import Engine


def get_engine(request: Request) -> Engine:
    """The app's Engine (loaded or not)."""
    return request.app.state.engine


def get_ready_engine(engine: Annotated[Engine, Depends(get_engine)]) -> Engine:
    """The Engine once its models are loaded; otherwise its one "not ready" 503 (service/errors.py)."""
    engine.require_ready()
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]
ReadyEngineDep = Annotated[Engine, Depends(get_ready_engine)]
