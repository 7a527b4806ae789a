"""run_server in a subprocess: SIGTERM drains gracefully and exits 0; a bad model exits non-zero."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import HANG_S

pytestmark = pytest.mark.slow

SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pi_axera_sd_service.api.server import run_server
    from pi_axera_sd_service.settings import Settings

    class Gated:
        # each UNet call waits until the test creates the release file (60 s at most)
        def __init__(self, inner, release):
            self.inner, self.release = inner, release
            self.path, self.backend = inner.path, inner.backend
            self.inputs, self.outputs = inner.inputs, inner.outputs
        def run(self, feed):
            deadline = time.monotonic() + 60
            while not self.release.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            return self.inner.run(feed)

    def wrap(role, session):
        return Gated(session, Path(sys.argv[3])) if role == "unet" else session

    settings = Settings(model_dir=sys.argv[1], backend="onnxruntime", port=int(sys.argv[2]),
                        host="127.0.0.1", state_dir=sys.argv[4], cache_dir=sys.argv[4], api_auth=None)
    sys.exit(run_server(settings, wrap=wrap))
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(demo_pack: Path, tmp_path: Path, release: Path) -> tuple[subprocess.Popen, str]:
    """The server in a subprocess; its UNet calls are held until `release` exists."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(demo_pack), str(port), str(release), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not start: {proc.communicate()[0]}")


def test_sigterm_finishes_running_job_503s_queued_and_exits_zero(demo_pack: Path, tmp_path: Path):
    release = tmp_path / "release-unet"
    proc, url = start_server(demo_pack, tmp_path, release)
    responses: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        body = {"prompt": name, "steps": 4}
        responses[name] = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=HANG_S)

    def wait_for(condition) -> None:
        deadline = time.monotonic() + HANG_S  # bounds a hang only
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.02)

    try:
        running = threading.Thread(target=post, args=("running",))
        running.start()  # its first UNet call is held until the release file exists
        wait_for(lambda: httpx.get(f"{url}/sdapi/v1/progress", timeout=HANG_S).json()["state"]["job"] != "")
        queued = threading.Thread(target=post, args=("queued",))
        queued.start()
        wait_for(lambda: httpx.get(f"{url}/internal/pending-tasks", timeout=HANG_S).json()["size"] == 1)

        proc.send_signal(signal.SIGTERM)
        queued.join(timeout=HANG_S)
        assert "queued" in responses and running.is_alive()  # answered while the running job is still held
        release.touch()
        running.join(timeout=HANG_S)
        output = proc.communicate(timeout=HANG_S)[0]
    finally:  # a failed step leaves no server behind
        release.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 0, output
    assert responses["queued"].status_code == 503
    assert "shutting down" in responses["queued"].json()["detail"]
    assert responses["running"].status_code == 200, responses["running"].text
    assert len(responses["running"].json()["images"]) == 1
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(f"{url}/health", timeout=2)


def test_model_that_fails_to_load_exits_nonzero_naming_the_file(tmp_path: Path):
    broken = tmp_path / "models"
    broken.mkdir()
    (broken / "unet.onnx").write_bytes(b"not an onnx file")
    script = textwrap.dedent(
        f"""
        import sys
        from pi_axera_sd_service.api.server import run_server
        from pi_axera_sd_service.settings import Settings
        sys.exit(run_server(Settings(model_dir={str(broken)!r}, backend="onnxruntime", port={free_port()},
                                     state_dir={str(tmp_path)!r}, cache_dir={str(tmp_path)!r})))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "models" in done.stderr and "Traceback" not in done.stderr
