"""Compatibility suite fixtures: the server under test (own demo server or --base-url) and the report."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from compat_tests.helpers import Target, make_init_image, parse_auth
from compat_tests.report import CompatReport

START_TIMEOUT = float(os.environ.get("COMPAT_START_TIMEOUT", "60"))
DEMO_AUTH = ("compat", "s3cret")
DEMO_MAX_IMAGES = 32  # demo images take milliseconds: long jobs for progress/interrupt checks need many


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("compat", "WebUI client compatibility suite (compat_tests/)")
    group.addoption("--base-url", action="store", default=None,
                    help="Run compat_tests against this running server (e.g. http://pi:5000) "
                         "instead of starting a demo server.")
    group.addoption("--api-auth", action="store", default=None,
                    help="user:pass for a server started with --api-auth (with --base-url).")
    group.addoption("--compat-report", action="store", default=None, metavar="PATH",
                    help="Write a Markdown client x check report to PATH.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "client(name): the client a compat test stands for")
    path = config.getoption("--compat-report", default=None)
    if path and not hasattr(config, "_compat_report"):
        config._compat_report = CompatReport(config, Path(path))
        config.pluginmanager.register(config._compat_report, "compat_report")


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = getattr(config, "_compat_report", None)
    if plugin is not None:
        config.pluginmanager.unregister(plugin)
        del config._compat_report


# --- the server under test -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The environment minus anything the service's Settings would read (PORT, HOST, API_AUTH, ...)."""
    env = dict(os.environ)
    try:
        from pi_axera_sd_service.settings import Settings

        names = {n.upper() for n in Settings.model_fields}
    except Exception:  # pragma: no cover - the package is importable in the venv
        names = {"HOST", "PORT", "API_AUTH", "DEMO", "STRICT"}
    return {k: v for k, v in env.items() if k.upper() not in names}


def _wait_ready(proc: subprocess.Popen, base_url: str, log_path: Path, auth) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        for path in ("/health",):  # 200 only once the models are loaded (ping answers while loading)
            try:
                r = requests.get(base_url + path, timeout=2, auth=auth)
                if r.status_code == 200:
                    return
                last = f"{path} -> {r.status_code}"
            except requests.RequestException as exc:
                last = f"{path} -> {type(exc).__name__}"
        time.sleep(0.2)
    tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
    _stop(proc)
    pytest.fail(f"demo server did not become ready in {START_TIMEOUT:.0f} s "
                f"(exit code {proc.returncode}, last: {last}).\n--- server log tail ---\n{tail}",
                pytrace=False)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _start_demo_server(config: pytest.Config, workdir: Path, name: str,
                       extra: list[str]) -> tuple[subprocess.Popen, Target]:
    port = _free_port()
    if os.environ.get("COMPAT_CACHE_DIR"):
        cache = Path(os.environ["COMPAT_CACHE_DIR"])
    elif getattr(config, "cache", None) is not None:  # stable across runs: the demo pack is made once
        cache = Path(config.cache.mkdir("compat_tests_cache"))
    else:
        cache = workdir / "cache"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "pi_axera_sd_service", "serve", "--demo",
           "--host", "127.0.0.1", "--port", str(port),
           "--cache-dir", str(cache), "--state-dir", str(workdir / "state"),
           "--output-dir", str(workdir / "output"), "--shutdown-timeout", "5",
           "--max-images-per-request", str(DEMO_MAX_IMAGES), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_clean_env(),
                                cwd=str(workdir))
    return proc, Target(base_url=f"http://127.0.0.1:{port}", demo=True, log_path=log_path)


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The server every compat test talks to: --base-url, or a demo server started for the session."""
    base_url = request.config.getoption("--base-url")
    auth = parse_auth(request.config.getoption("--api-auth"))
    if base_url:
        tgt = Target(base_url=base_url.rstrip("/"), auth=auth, demo=False)
        _record_target(request.config, tgt)
        yield tgt
        return
    proc, tgt = _start_demo_server(request.config, tmp_path_factory.mktemp("compat_server"), "server", [])
    try:
        _wait_ready(proc, tgt.base_url, tgt.log_path, None)
        _record_target(request.config, tgt)
        yield tgt
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def auth_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                target: Target) -> Iterator[Target]:
    """A server with HTTP Basic auth on: a second demo server, or --base-url with --api-auth."""
    if not target.demo:
        if target.auth is None:
            pytest.skip("remote target without --api-auth: auth checks skipped")
        yield target
        return
    proc, tgt = _start_demo_server(request.config, tmp_path_factory.mktemp("compat_auth_server"),
                                   "auth_server", ["--api-auth", ":".join(DEMO_AUTH)])
    tgt.auth = DEMO_AUTH
    try:
        _wait_ready(proc, tgt.base_url, tgt.log_path, DEMO_AUTH)
        yield tgt
    finally:
        _stop(proc)


def _record_target(config: pytest.Config, tgt: Target) -> None:
    plugin = getattr(config, "_compat_report", None)
    if plugin is None:
        return
    health = {}
    try:
        r = requests.get(tgt.url("/health"), auth=tgt.auth, timeout=10)
        health = r.json() if r.ok else {}
    except (requests.RequestException, ValueError):
        pass
    commit = ""
    if tgt.demo:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=config.rootpath,
                                    capture_output=True, text=True, timeout=10).stdout.strip()
    plugin.set_target(tgt, health, commit)


@pytest.fixture(scope="session")
def long_job(target) -> dict[str, int]:
    """batch_size/n_iter of a job long enough to watch /progress and interrupt it (1-2 s on the demo pack)."""
    return {"batch_size": 4, "n_iter": 8} if target.demo else {"batch_size": 2, "n_iter": 4}


@pytest.fixture(scope="session")
def init_image():
    """A small non-square init image, made at run time."""
    return make_init_image()


@pytest.fixture(scope="session")
def model_title(target: Target) -> str:
    """The title of the one loaded model, as /sd-models lists it."""
    r = requests.get(target.url("/sdapi/v1/sd-models"), auth=target.auth, timeout=30)
    r.raise_for_status()
    models = r.json()
    assert models, "/sdapi/v1/sd-models is empty"
    return models[0]["title"]
