"""Shared fixtures: the demo pack, loaded demo models, settings, a TestClient and a live uvicorn server.

Session wrappers (`wrap_factory`) add a per-call delay, a fault or a gate to chosen roles. A gate holds a
role's calls until the test lets them through, so a test can look at the server while a job is provably
mid-run, however slow the machine is: order events with gates, never with a delay (a busy CPU breaks that).
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

HANG_S = 60.0  # bounds a hang only: a condition that needs longer than this is broken, not slow


class Gate:
    """Holds each session call at its start until the test lets it through (`allow`, `open`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.waiting = 0  # calls held right now
        self.passed = 0  # calls let through so far
        self._allowed = 0
        self._open = False

    def enter(self) -> None:
        with self._cond:
            self.waiting += 1
            self._cond.notify_all()
            released = self._cond.wait_for(lambda: self._open or self._allowed > 0, timeout=HANG_S)
            self.waiting -= 1
            self.passed += 1
            if not self._open and released:
                self._allowed -= 1
            self._cond.notify_all()
        if not released:
            raise RuntimeError(f"test gate was never opened within {HANG_S:g} s")

    def wait_held(self, passed: int | None = None, timeout: float = HANG_S) -> None:
        """Block until a call is held (and, if given, exactly `passed` calls went through before it)."""
        with self._cond:
            held = self._cond.wait_for(
                lambda: self.waiting > 0 and (passed is None or self.passed == passed), timeout=timeout)
        assert held, f"no call held at the gate within {timeout:g} s (passed {self.passed})"

    @property
    def held(self) -> bool:
        return self.waiting > 0

    def allow(self, calls: int = 1) -> None:
        with self._cond:
            self._allowed += calls
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def close(self) -> None:
        """Hold calls again from now on."""
        with self._cond:
            self._open, self._allowed = False, 0


class ScriptedSession:
    """A Session wrapper: waits at `gate`, sleeps `delay_s` per run, raises on chosen calls (1-based)."""

    def __init__(self, inner: Session, delay_s: float = 0.0, fail_calls: set[int] | None = None,
                 error: str = "simulated runtime failure", gate: Gate | None = None):
        self.inner = inner
        self.path, self.backend = inner.path, inner.backend
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.delay_s = delay_s
        self.fail_calls = fail_calls or set()
        self.error = error
        self.gate = gate
        self.calls = 0
        self._lock = threading.Lock()

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            self.calls += 1
            call = self.calls
        if self.gate is not None:
            self.gate.enter()
        if self.delay_s:
            time.sleep(self.delay_s)
        if call in self.fail_calls:
            raise RuntimeError(self.error)
        return self.inner.run(feed)


class WrapRecorder:
    """wrap(role, session) for Engine/load_models; keeps the wrapped sessions for assertions.

    `gated` roles wait at a Gate per call (`recorder.gates[role]`); `open_gates()` lets everything through.
    """

    def __init__(self, delays: Mapping[str, float] | None = None,
                 fail_calls: Mapping[str, set[int]] | None = None, error: str = "simulated runtime failure",
                 gated: tuple[str, ...] = ()):
        self.gates = {role: Gate() for role in gated}
        self.delays = dict(delays or {})
        self.fail_calls = {k: set(v) for k, v in (fail_calls or {}).items()}
        self.error = error
        self.sessions: dict[str, ScriptedSession] = {}

    def __call__(self, role: str, session: Session) -> Session:
        wrapped = ScriptedSession(session, self.delays.get(role, 0.0), self.fail_calls.get(role), self.error,
                                  self.gates.get(role))
        self.sessions[role] = wrapped
        return wrapped

    def calls(self, role: str) -> int:
        return self.sessions[role].calls if role in self.sessions else 0

    def open_gates(self) -> None:
        for gate in self.gates.values():
            gate.open()


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
def wrap_factory() -> Iterator[Callable[..., WrapRecorder]]:
    """WrapRecorder(delays={role: s}, fail_calls={role: {n}}, gated=(role,)) — a session wrapper for Engine.

    Gates left closed by a failing test are opened at teardown so its engine can stop.
    """
    made: list[WrapRecorder] = []

    def make(*args: Any, **kwargs: Any) -> WrapRecorder:
        made.append(WrapRecorder(*args, **kwargs))
        return made[-1]

    yield make
    for recorder in made:
        recorder.open_gates()


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
