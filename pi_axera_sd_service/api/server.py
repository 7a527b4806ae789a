"""run_server: uvicorn with graceful shutdown; the lifespan loads the models in the background.

While they load, /health is 503 "starting"; a load failure stops the server with EXIT_MODEL_LOAD (4).

On a signal: new jobs get 503, queued jobs get 503 at once, the running job may finish (past
`shutdown_timeout` it is interrupted and returns what it has), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import signal
import threading
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..exit_codes import EXIT_FAILURE, EXIT_MODEL_LOAD, EXIT_OK
from ..runtime.model_dir import Wrap
from ..service.engine import Engine
from ..service.host_memory import tune_malloc
from ..settings import Settings, is_exposed
from .app import create_app

log = logging.getLogger(__name__)

GRACE_AFTER_INTERRUPT_S = 10.0  # an interrupted job still decodes and encodes its image


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    """Plain lines by default; JSON lines on every root handler with log_json."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(settings.log_level.upper())
    if settings.log_json:
        for handler in root.handlers:
            handler.setFormatter(JsonLogFormatter())


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head: a connection that has not sent
    a complete request line and headers `header_timeout` seconds after it opened (or after the
    previous response) is closed, so idle and slow-header clients cannot hold a connection forever.
    The body has its own deadline (BodyLimitMiddleware, body_timeout)."""

    header_timeout = 10.0
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        # An empty context: armed at the end of a response, the handle would otherwise keep that
        # request's context (its log record) alive until it fires, even once cancelled.
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_deadline_passed,
                                                     context=contextvars.Context())

    def _header_deadline_passed(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no request in progress: nothing to answer


def protocol_with_header_deadline(header_timeout: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class uvicorn instantiates per connection, with this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": header_timeout})


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains the engine first and exits normally (no re-raised signal)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._drainer: threading.Thread | None = None

    async def on_tick(self, counter: int) -> bool:
        if self.engine.load_error:  # the lifespan's background model load failed: stop serving
            self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        log.info("signal %s: draining (running job may take up to %.0f s)", sig, self.shutdown_timeout)
        self.should_exit = True
        if self._drainer is None:  # outside the signal handler: the handler may interrupt lock holders
            self._drainer = threading.Thread(target=self._drain, name="drain", daemon=True)
            self._drainer.start()

    def _drain(self) -> None:
        self.engine.begin_shutdown()
        if not self.engine.queue.wait_idle(self.shutdown_timeout):
            log.warning("running job exceeded shutdown_timeout=%.1f s: interrupting it",
                        self.shutdown_timeout)
            self.engine.interrupt()


def server_config(settings: Settings, app: Any) -> uvicorn.Config:
    """uvicorn's configuration: our logging, the connection bounds and timeouts from `settings`."""
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_timeout + GRACE_AFTER_INTERRUPT_S),
        http=protocol_with_header_deadline(settings.header_timeout),
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type] - call_later takes float
        limit_concurrency=settings.max_connections,
    )


def run_server(settings: Settings, wrap: Wrap | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code. `wrap(role, session)` is for tests."""
    configure_logging(settings)
    if settings.lean_memory:  # before any thread starts: every thread then shares the one arena
        tune_malloc()
    if is_exposed(settings.host) and not settings.api_auth:
        log.warning("listening on %s without --api-auth: anyone who can reach this port can use the NPU "
                    "(set API_AUTH=user:pass or bind 127.0.0.1)", settings.host)
    engine = Engine(settings, wrap=wrap)
    config = server_config(settings, create_app(settings, engine, load_in_background=True))
    server = GracefulServer(config, engine, settings.shutdown_timeout)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        log.error("the HTTP server stopped: exit code %s", exc.code)
        return int(exc.code or EXIT_FAILURE) if not isinstance(exc.code, str) else EXIT_FAILURE
    if engine.load_error:
        log.error("exit code %d: the models failed to load (%s). A configuration error: systemd does not "
                  "restart the unit; fix the model settings, then `systemctl restart`", EXIT_MODEL_LOAD,
                  engine.load_error)
        return EXIT_MODEL_LOAD
    if not server.started:
        log.error("the HTTP server did not start on %s:%s", settings.host, settings.port)
        return EXIT_FAILURE
    log.info("stopped")
    return EXIT_OK
