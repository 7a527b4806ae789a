"""Error bodies: A1111's `{error, detail, body, errors}` for /sdapi, `{status: "error", error}` for /generate.

`classify(exc)` maps the service's exceptions to (status, message, headers); anything else is a
server fault and is re-raised to the app's handlers.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from ..pipeline.stages import StageError
from ..service.queue import ClientDisconnectedError, ServiceUnavailableError
from ..service.request import RequestError
from .openai_protocol import openai_error_body


def a1111_body(detail: Any, error: str = "HTTPException", status_code: int | None = None) -> dict[str, Any]:
    """A1111's `handle_exception` body (`errors` is str(HTTPException) under current Starlette)."""
    errors = f"{status_code}: {detail}" if status_code is not None else str(detail)
    return {"error": error, "detail": detail, "body": "", "errors": errors}


def server_fault_body(path: str, exc: BaseException) -> dict[str, Any]:
    """The 500 body for an unexpected exception, in the shape of the route family (no internals)."""
    if path == "/generate":
        return {"status": "error", "error": f"internal server error ({type(exc).__name__})"}
    if path.startswith("/v1/"):
        return openai_error_body(500, f"internal server error ({type(exc).__name__})")
    return a1111_body("", type(exc).__name__, 500)


def a1111_error(
    status_code: int, detail: Any, error: str = "HTTPException", headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(a1111_body(detail, error, status_code), status_code=status_code, headers=headers)


def generate_error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The upstream `/generate` error shape."""
    return JSONResponse({"status": "error", "error": message}, status_code=status_code, headers=headers)


def classify(exc: BaseException) -> tuple[int, str, dict[str, str], str] | None:
    """(status, message, headers, error name) for the exceptions a generation route expects, else None."""
    if isinstance(exc, RequestError):
        return exc.status_code, exc.message, {}, "HTTPException"
    if isinstance(exc, ServiceUnavailableError):
        return exc.status_code, str(exc.detail), dict(exc.headers), type(exc).__name__
    if isinstance(exc, StageError):
        return 500, f"The {exc.stage} stage failed: {exc.message}", {}, "StageError"
    if isinstance(exc, ClientDisconnectedError):
        return ClientDisconnectedError.status_code, str(exc), {}, type(exc).__name__
    return None


def sdapi_error_for(exc: BaseException) -> JSONResponse | None:
    found = classify(exc)
    if found is None:
        return None
    status, message, headers, name = found
    return a1111_error(status, message, name, headers or None)


def generate_error_for(exc: BaseException, client_error_status: int = 400) -> JSONResponse | None:
    """/generate: every client error is a 400 (as the upstream service); server faults keep 5xx."""
    found = classify(exc)
    if found is None:
        return None
    status, message, headers, _ = found
    if isinstance(exc, RequestError):
        status = client_error_status
    return generate_error(status, message, headers or None)
