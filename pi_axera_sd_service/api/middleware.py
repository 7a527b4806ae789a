"""Pure ASGI middlewares: request id + one access-log line + request metrics, auth (HTTP Basic and
Bearer keys), and the request body (size limit, read deadline, the one JSON parser; it keeps the
body for the log)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..service.metrics import REQUEST_LOG, ServiceMetrics, http_method_label
from ..settings import Settings
from .body import BodyError, parse_json_body
from .errors import client_error_body, server_fault_body, unauthorized_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("pi_axera_sd_service.access")

REQUEST_ID_HEADER = "x-request-id"
BODY_METHODS = {"POST", "PUT", "PATCH"}
OPEN_PATHS = ("/internal/ping", "/health")
QUIET_ROUTES = {"/sdapi/v1/progress", "/internal/progress", "/internal/ping", "/health", "/metrics"}
DRAIN_FACTOR = 4                # read (and discard) oversize bodies up to this multiple of the limit
PARSE_OFF_LOOP_BYTES = 1 << 20  # bodies above this are parsed on a thread (the loop keeps serving)
JSON_BODY_STATE_KEY = "json_body"  # scope["state"][...]: the parsed, checked body (see parsed_json_body)
BASE64_MIN_CHARS = 256
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")
_DATA_URI_RE = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
# Request fields that carry images (A1111, /generate, extensions such as ControlNet).
IMAGE_FIELDS = frozenset({"init_images", "init_image", "mask", "latent_mask", "image", "images",
                          "firstpass_image", "input_image", "control_image", "base64"})


def parsed_json_body(scope: Scope) -> Any:
    """The body the middleware already parsed and checked (None when the request had no JSON body)."""
    return scope.get("state", {}).get(JSON_BODY_STATE_KEY)


async def send_json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    """Send a complete JSON response from a middleware."""
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def redact(value: Any, key: str | None = None) -> Any:
    """Parameters for the log: every base64 string becomes `<base64: N chars>`, however deep.

    Image fields (by name) and data URIs are redacted at any length; other strings when they are
    long and look like base64."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str) and _is_base64(value, key):
        return f"<base64: {len(value)} chars>"
    return value


def _is_base64(text: str, key: str | None) -> bool:
    if _DATA_URI_RE.match(text):
        return True
    if len(text) < BASE64_MIN_CHARS and key not in IMAGE_FIELDS:
        return False
    return bool(text) and _BASE64_RE.match(text[:4096]) is not None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


# --- request id, access log, metrics -------------------------------------------------------------
class RequestLogMiddleware:
    """X-Request-Id (an incoming one is kept), one log line per request, request counters."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ServiceMetrics,
                 route_label: Callable[[Scope], str]):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.route_label = route_label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming[:128] if incoming else uuid.uuid4().hex[:16]
        record: dict[str, Any] = {"request_id": request_id}
        token = REQUEST_LOG.set(record)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - last resort: log, answer 500 without a traceback
            access_log.error("unhandled %s in %s %s: %s", type(exc).__name__, scope["method"],
                             scope["path"], exc, exc_info=exc)
            record["error"] = f"{type(exc).__name__}: {exc}"
            if not response_started:
                await send_with_id_safe(send_with_id, server_fault_body(scope["path"], exc))
            status = 500
        finally:
            REQUEST_LOG.reset(token)
            self._account(scope, record, status, (time.perf_counter() - started) * 1000.0)

    def _account(self, scope: Scope, record: dict[str, Any], status: int, ms: float) -> None:
        """Count and log the request; a body the log cannot show never costs the access line."""
        route = self.route_label(scope)
        self.metrics.requests.labels(route=route, method=http_method_label(scope["method"]),
                                     status=str(status)).inc()
        try:
            self._log(scope, record, route, status, ms)
        except Exception as exc:  # noqa: BLE001 - the line without its parameters, and why
            access_log.warning("request_id=%s method=%s route=%s status=%s (parameters not logged: %s)",
                               record.get("request_id"), http_method_label(scope["method"]), route,
                               status, type(exc).__name__)
        finally:  # asyncio handles armed during the request keep its context (and this record) alive
            record.clear()

    def _log(self, scope: Scope, record: dict[str, Any], route: str, status: int, ms: float) -> None:
        level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        line: dict[str, Any] = {"request_id": record.pop("request_id"), "method": scope["method"],
                                "route": route, "status": status, "ms": round(ms, 1)}
        params = _parameters(scope, record.pop("_body_bytes", 0), record.pop("_json", None))
        if params is not None:
            line["params"] = params
        line.update(record)
        if self.settings.log_json:
            access_log.log(level, json.dumps(line, default=str))
        else:
            access_log.log(level, " ".join(f"{k}={_plain(v)}" for k, v in line.items()))


async def send_with_id_safe(send: Send, body: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):  # the client may be gone
        await send_json(send, 500, body)


def _plain(value: Any) -> str:
    return value if isinstance(value, str) and " " not in value else json.dumps(value, default=str)


def _parameters(scope: Scope, body_bytes: int, parsed: Any) -> Any:
    """Redacted JSON body (as the body middleware parsed and checked it), or the query string."""
    if parsed is not None:
        return redact(parsed)
    if body_bytes:
        return f"<{body_bytes} bytes>"
    query = scope.get("query_string", b"").decode("latin-1")
    return query or None


# --- auth: HTTP Basic and Bearer keys --------------------------------------------------------------
def parse_credentials(api_auth: str) -> list[bytes]:
    """`user:pass[,user2:pass2]` -> [b"user:pass", ...]: what a Basic header decodes to (the user
    ends at the first colon, as A1111 splits it; an entry without one has an empty password)."""
    entries = [entry.strip().partition(":") for entry in api_auth.split(",") if entry.strip()]
    return [f"{user}:{password}".encode() for user, _, password in entries]


def parse_api_keys(api_keys: str) -> list[bytes]:
    """`key1[,key2]` -> [key1, key2] (UTF-8 bytes, blanks dropped)."""
    return [key.strip().encode() for key in api_keys.split(",") if key.strip()]


def _any_matches(candidate: bytes, known: list[bytes]) -> bool:
    """Constant time per entry: every entry is compared, no early exit."""
    matched = False
    for entry in known:
        matched |= secrets.compare_digest(candidate, entry)
    return matched


class AuthMiddleware:
    """401 unless the request carries matching HTTP Basic credentials (`api_auth`) or a Bearer key
    (`api_keys`). The body is the route family's (A1111's; OpenAI's on /v1/*); WWW-Authenticate
    names the scheme. Probes stay open unless `auth_health`."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.credentials = parse_credentials(settings.api_auth or "")
        self.keys = parse_api_keys(settings.api_keys or "")
        self.open_paths = () if settings.auth_health else OPEN_PATHS
        self.challenge = "Basic" if self.credentials else "Bearer"

    def _authorized(self, header: str | None) -> str | None:
        """None when authorized, else the error detail."""
        scheme, _, value = (header or "").strip().partition(" ")
        if scheme.lower() == "bearer" and self.keys:
            token = value.strip().encode("latin-1")  # the bytes as sent (headers are decoded as latin-1)
            return None if _any_matches(token, self.keys) else "Incorrect API key provided"
        if scheme.lower() != "basic" or not self.credentials:
            return "Not authenticated"
        try:
            user_pass = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return "Not authenticated"
        if b":" not in user_pass:
            return "Not authenticated"
        return None if _any_matches(user_pass, self.credentials) else "Incorrect username or password"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not (self.credentials or self.keys) or scope["method"] == "OPTIONS"
                or scope["path"] in self.open_paths):
            await self.app(scope, receive, send)
            return
        problem = self._authorized(_header(scope, b"authorization"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        record = REQUEST_LOG.get()
        if record is not None:
            record["error"] = problem
        await send_json(send, 401, unauthorized_body(scope["path"], problem),
                        {"WWW-Authenticate": self.challenge})


# --- request body: size limit, read deadline, the one JSON parser ---------------------------------
class BodyLimitMiddleware:
    """413 past max_body_bytes, 408 past body_timeout, 400 for a body the JSON parser refuses.

    Every route gets the body replayed; a JSON body was parsed and checked once (`parsed_json_body`),
    so no route's own parser meets a body nested 1,000 deep or a 5,000-digit number."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ServiceMetrics):
        self.app = app
        self.limit = settings.max_body_bytes
        self.timeout = settings.body_timeout
        self.metrics = metrics

    def _message(self, size: str) -> str:
        return (f"Request body is {size}; the limit is max_body_bytes={self.limit} bytes "
                f"(raise it with --max-body-bytes / MAX_BODY_BYTES)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            drained = True
            try:  # a trickling client does not hold the 413 back
                await asyncio.wait_for(self._drain(receive, 0), self.timeout)
            except asyncio.TimeoutError:
                drained = False
            await self._refuse(scope, send, 413, "body_too_large", self._message(f"{int(declared)} bytes"),
                               close=not drained)
            return
        try:
            body = await asyncio.wait_for(self._read(scope, receive, send), self.timeout)
        except asyncio.TimeoutError:
            await self._refuse(scope, send, 408, "body_timeout",
                               f"The request body did not arrive within body_timeout={self.timeout:g} s",
                               close=True)
            return
        if body is None:  # refused (413) or the client left
            return
        record = REQUEST_LOG.get()
        if record is not None:
            record["_body_bytes"] = len(body)
        if body and _is_json(scope):
            try:
                parsed = (await asyncio.to_thread(parse_json_body, body) if len(body) > PARSE_OFF_LOOP_BYTES
                          else parse_json_body(body))
            except BodyError as exc:
                await self._refuse(scope, send, 400, "bad_body", str(exc), field=exc.path or None)
                return
            scope.setdefault("state", {})[JSON_BODY_STATE_KEY] = parsed
            if record is not None:
                record["_json"] = parsed
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:  # uvicorn keeps the scope of a keep-alive connection's last request until the next
            scope.get("state", {}).pop(JSON_BODY_STATE_KEY, None)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body; None after answering 413 (or when the client disconnected)."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.limit:
                if more:
                    await self._drain(receive, size)
                await self._refuse(scope, send, 413, "body_too_large",
                                   self._message(f"more than {self.limit} bytes"))
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _drain(self, receive: Receive, size: int) -> None:
        """Discard the rest of an oversize body (bounded) so the client can read the 413."""
        while size <= self.limit * DRAIN_FACTOR:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, scope: Scope, send: Send, status: int, reason: str, message: str,
                      close: bool = False, field: str | None = None) -> None:
        self.metrics.reject(reason)
        record = REQUEST_LOG.get()
        if record is not None:
            record["error"] = message
        await send_json(send, status, client_error_body(scope["path"], status, message, field),
                        {"Connection": "close"} if close else None)


def _is_json(scope: Scope) -> bool:
    """Every body is read as JSON except multipart uploads (no route takes those)."""
    content_type = (_header(scope, b"content-type") or "").lower()
    return not content_type.startswith("multipart/")
