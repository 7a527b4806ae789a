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

pytestmark = pytest.mark.slow

SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pi_axera_sd_service.api.server import run_server
    from pi_axera_sd_service.settings import Settings

    class Slow:
        def __init__(self, inner, delay):
            self.inner, self.delay = inner, delay
            self.path, self.backend = inner.path, inner.backend
            self.inputs, self.outputs = inner.inputs, inner.outputs
        def run(self, feed):
            time.sleep(self.delay)
            return self.inner.run(feed)

    def wrap(role, session):
        return Slow(session, float(sys.argv[3]) if role == "unet" else 0.0)

    settings = Settings(model_dir=sys.argv[1], backend="onnxruntime", port=int(sys.argv[2]),
                        host="127.0.0.1", state_dir=sys.argv[4], cache_dir=sys.argv[4], api_auth=None)
    sys.exit(run_server(settings, wrap=wrap))
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(demo_pack: Path, tmp_path: Path, unet_delay: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(demo_pack), str(port), str(unet_delay), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not start: {proc.communicate()[0]}")


def test_sigterm_finishes_running_job_503s_queued_and_exits_zero(demo_pack: Path, tmp_path: Path):
    proc, url = start_server(demo_pack, tmp_path, unet_delay=0.4)
    responses: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        responses[name] = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": name, "steps": 4}, timeout=30)

    running = threading.Thread(target=post, args=("running",))
    running.start()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/sdapi/v1/progress", timeout=5).json()["state"]["job"] == "":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    queued = threading.Thread(target=post, args=("queued",))
    queued.start()
    while httpx.get(f"{url}/internal/pending-tasks", timeout=5).json()["size"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)

    proc.send_signal(signal.SIGTERM)
    queued.join(timeout=10)
    running.join(timeout=30)
    output = proc.communicate(timeout=30)[0]

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
