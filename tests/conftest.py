"""Shared fixtures: the demo pack, loaded demo models, settings, a TestClient and a live uvicorn server.

Session wrappers (`wrap_factory`) add a per-call delay or a fault to chosen roles, so that jobs
overlap the way they do on the NPU.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from pi_axera_sd_service.runtime.demo_pack import make_demo_pack
from pi_axera_sd_service.runtime.model_dir import LoadedModels, Wrap, load_models, resolve_model_files
from pi_axera_sd_service.runtime.session import Session
from pi_axera_sd_service.settings import Settings


class ScriptedSession:
    """A Session wrapper: sleeps `delay_s` per run and raises on chosen call numbers (1-based)."""

    def __init__(self, inner: Session, delay_s: float = 0.0, fail_calls: set[int] | None = None,
                 error: str = "simulated runtime failure"):
        self.inner = inner
        self.path, self.backend = inner.path, inner.backend
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.delay_s = delay_s
        self.fail_calls = fail_calls or set()
        self.error = error
        self.calls = 0
        self._lock = threading.Lock()

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            self.calls += 1
            call = self.calls
        if self.delay_s:
            time.sleep(self.delay_s)
        if call in self.fail_calls:
            raise RuntimeError(self.error)
        return self.inner.run(feed)


class WrapRecorder:
    """wrap(role, session) for Engine/load_models; keeps the wrapped sessions for assertions."""

    def __init__(self, delays: Mapping[str, float] | None = None,
                 fail_calls: Mapping[str, set[int]] | None = None, error: str = "simulated runtime failure"):
        self.delays = dict(delays or {})
        self.fail_calls = {k: set(v) for k, v in (fail_calls or {}).items()}
        self.error = error
        self.sessions: dict[str, ScriptedSession] = {}

    def __call__(self, role: str, session: Session) -> Session:
        wrapped = ScriptedSession(session, self.delays.get(role, 0.0), self.fail_calls.get(role), self.error)
        self.sessions[role] = wrapped
        return wrapped

    def calls(self, role: str) -> int:
        return self.sessions[role].calls if role in self.sessions else 0


@pytest.fixture(scope="session")
def demo_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model pack, generated once per test session."""
    return make_demo_pack(tmp_path_factory.mktemp("demo_pack"))


@pytest.fixture(scope="session")
def demo_models(demo_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModels:
    """The demo pack loaded once (engines wrap these sessions with their own wrappers)."""
    files, backend = resolve_model_files(model_dir=demo_pack, backend="onnxruntime")
    return load_models(files, backend, cache_dir=tmp_path_factory.mktemp("hash_cache"))


@pytest.fixture()
def settings_factory(demo_pack: Path, tmp_path: Path) -> Callable[..., Settings]:
    """Settings on the demo pack with state/output/cache in tmp; keyword overrides on top."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": demo_pack, "backend": "onnxruntime", "demo": False, "api_auth": None,
            "api_keys": None, "cors_allow_origins": None, "cors_allow_origins_regex": None,
            "state_dir": tmp_path / "state", "output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture()
def wrap_factory() -> Callable[..., WrapRecorder]:
    """WrapRecorder(delays={role: s}, fail_calls={role: {n}}) — a session wrapper for Engine."""
    return WrapRecorder


@pytest.fixture()
def make_client(demo_models: LoadedModels) -> Iterator[Callable[..., TestClient]]:
    """make_client(settings, wrap=None) -> a started TestClient (closed at teardown)."""
    from pi_axera_sd_service.api.app import create_app
    from pi_axera_sd_service.service.engine import Engine

    clients: list[TestClient] = []

    def make(settings: Settings, wrap: Wrap | None = None) -> TestClient:
        client = TestClient(create_app(settings, Engine(settings, models=demo_models, wrap=wrap)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture()
def app_client(
    make_client: Callable[..., TestClient], settings_factory: Callable[..., Settings]
) -> TestClient:
    """A TestClient on the demo pack with default settings."""
    return make_client(settings_factory())


class LiveServer:
    """The real app under uvicorn on 127.0.0.1 at an ephemeral port, in a thread."""

    def __init__(self, app: Any, engine: Any):
        self.app = app
        self.engine = engine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("live server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture()
def live_server(demo_models: LoadedModels) -> Iterator[Callable[..., LiveServer]]:
    """live_server(settings, wrap=None) -> a started LiveServer (stopped at teardown)."""
    from pi_axera_sd_service.api.app import create_app
    from pi_axera_sd_service.service.engine import Engine

    servers: list[LiveServer] = []

    def start(settings: Settings, wrap: Wrap | None = None) -> LiveServer:
        engine = Engine(settings, models=demo_models, wrap=wrap)
        server = LiveServer(create_app(settings, engine), engine)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
