"""run_server: uvicorn with graceful shutdown; the lifespan loads the models in the background.

While they load, /health is 503 "starting"; a load failure stops the server with exit code 2.

On a signal: new jobs get 503, queued jobs get 503 at once, the running job may finish (past
`shutdown_timeout` it is interrupted and returns what it has), then the process exits 0.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from types import FrameType

import uvicorn

from ..runtime.model_dir import Wrap
from ..service.engine import Engine
from ..settings import Settings, is_exposed
from .app import create_app

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_MODEL_LOAD_FAILED = 2
EXIT_SERVER_FAILED = 1
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


def run_server(settings: Settings, wrap: Wrap | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code. `wrap(role, session)` is for tests."""
    configure_logging(settings)
    if is_exposed(settings.host) and not settings.api_auth:
        log.warning("listening on %s without --api-auth: anyone who can reach this port can use the NPU "
                    "(set API_AUTH=user:pass or bind 127.0.0.1)", settings.host)
    engine = Engine(settings, wrap=wrap)
    config = uvicorn.Config(
        create_app(settings, engine, load_in_background=True), host=settings.host, port=settings.port,
        log_config=None,
        access_log=False, lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_timeout + GRACE_AFTER_INTERRUPT_S),
    )
    server = GracefulServer(config, engine, settings.shutdown_timeout)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        log.error("the HTTP server stopped: exit code %s", exc.code)
        return int(exc.code or EXIT_SERVER_FAILED) if not isinstance(exc.code, str) else EXIT_SERVER_FAILED
    if engine.load_error:
        return EXIT_MODEL_LOAD_FAILED
    if not server.started:
        log.error("the HTTP server did not start on %s:%s", settings.host, settings.port)
        return EXIT_SERVER_FAILED
    log.info("stopped")
    return EXIT_OK
