"""FastAPI dependencies: the engine of this app, the engine once its models are loaded, and the
engine a generation request waits for.

While the models load (≈15 s on the NPU) routes answer by what their clients expect:
- generation routes (`GenerationEngineDep`) wait for the load, up to `queue_timeout`, as a job
  would wait in the queue; a failed load answers them its 503 at once;
- options and /capabilities (`ReadyEngineDep`) answer 503 + Retry-After at once: UIs call them to
  probe the server and should not hang;
- everything else (`EngineDep`) answers from what it has (sd-models is [] while loading).
"""

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


async def get_generation_engine(engine: Annotated[Engine, Depends(get_engine)]) -> Engine:
    """The Engine once its models are loaded, waiting up to `queue_timeout` for a load under way."""
    await engine.wait_ready(engine.settings.queue_timeout)
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]
ReadyEngineDep = Annotated[Engine, Depends(get_ready_engine)]
GenerationEngineDep = Annotated[Engine, Depends(get_generation_engine)]
