"""The one map from the service's errors to HTTP responses, in the body shape of the route family.

`describe(exc)` turns a service error (service/errors.py) or a model stage failure into an
ApiError; the family of the request path then shapes the body: `{status: "error", error}` for
/generate (every client error a 400, as upstream), A1111's `{error, detail, body, errors}` for
everything else. `add_error_family` is the hook for another family (routers/openai.py adds OpenAI's
`{"error": {...}}` under /v1/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from ..pipeline.prompt_parser import PromptError
from ..pipeline.stages import StageError
from ..service.errors import RequestError, ServiceError


@dataclass(frozen=True)
class ApiError:
    """One error as every family sees it."""

    status_code: int
    message: str                 # for the client; "" for a server fault (no internals)
    error: str                   # the error's name (A1111 `error`)
    client_error: bool = False   # the request was wrong (RequestError and its subclasses)
    headers: dict[str, str] = field(default_factory=dict)
    field: str | None = None     # the request field at fault (RequestError.field)


Shape = Callable[[ApiError], tuple[int, dict[str, Any]]]   # -> (status, body)


def describe(exc: BaseException) -> ApiError | None:
    """The ApiError of a service error or a stage failure; None for anything else (a server fault)."""
    if isinstance(exc, RequestError):
        return ApiError(exc.status_code, exc.message, exc.error_name, True, dict(exc.headers), exc.field)
    if isinstance(exc, ServiceError):
        return ApiError(exc.status_code, exc.message, exc.error_name, headers=dict(exc.headers))
    if isinstance(exc, PromptError):  # a prompt that reached the pipeline unchecked (e.g. from infotext)
        return ApiError(400, str(exc), "HTTPException", client_error=True)
    if isinstance(exc, StageError):
        return ApiError(500, f"The {exc.stage} stage failed: {exc.message}", "StageError")
    return None


def a1111_body(detail: Any, error: str = "HTTPException", status_code: int | None = None) -> dict[str, Any]:
    """A1111's `handle_exception` body (`errors` is str(HTTPException) under current Starlette)."""
    errors = f"{status_code}: {detail}" if status_code is not None else str(detail)
    return {"error": error, "detail": detail, "body": "", "errors": errors}


def a1111_shape(err: ApiError) -> tuple[int, dict[str, Any]]:
    return err.status_code, a1111_body(err.message, err.error, err.status_code)


def generate_shape(err: ApiError) -> tuple[int, dict[str, Any]]:
    """The upstream `/generate` shape: every client error is a 400; server faults keep 5xx."""
    message = err.message or f"internal server error ({err.error})"
    return (400 if err.client_error else err.status_code), {"status": "error", "error": message}


_FAMILIES: list[tuple[Callable[[str], bool], Shape]] = [
    (lambda path: path == "/generate", generate_shape),
]
_BUILT_IN_SHAPES = (a1111_shape, generate_shape)


def add_error_family(matches: Callable[[str], bool], shape: Shape) -> None:
    """Give the paths `matches` accepts their own error body shape (checked before the others).

    An added family also shapes what the built-in ones leave as they are: Starlette's HTTP errors
    (404, 405) and the 401 of the auth middleware."""
    _FAMILIES.insert(0, (matches, shape))


def in_added_family(path: str) -> bool:
    """Whether a family given by `add_error_family` claims `path`."""
    return shape_for(path) not in _BUILT_IN_SHAPES


def shape_for(path: str) -> Shape:
    """The family's shape for `path`; A1111's when no family claims it."""
    return next((shape for matches, shape in _FAMILIES if matches(path)), a1111_shape)


def error_response(path: str, err: ApiError) -> JSONResponse:
    status, body = shape_for(path)(err)
    return JSONResponse(body, status_code=status, headers=err.headers or None)


def client_error_body(path: str, status: int, message: str, field: str | None = None) -> dict[str, Any]:
    """A 4xx body refused before routing (body checks, limits), in the shape of the route family;
    `field`: where in the body (e.g. `seed`, `init_images[0]`), when the check knows."""
    return shape_for(path)(ApiError(status, message, "HTTPException", field=field))[1]


def unauthorized_body(path: str, message: str) -> dict[str, Any]:
    """The auth middleware's 401 body: A1111's (also on /generate, as upstream), an added family's own."""
    if in_added_family(path):
        return client_error_body(path, 401, message)
    return a1111_body(message, "HTTPException", 401)


def server_fault_body(path: str, exc: BaseException) -> dict[str, Any]:
    """The 500 body for an unexpected exception, in the shape of the route family (no internals)."""
    return shape_for(path)(ApiError(500, "", type(exc).__name__))[1]
