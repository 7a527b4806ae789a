"""Two service instances on the demo pack behind real HAProxy, configured by deploy/haproxy.cfg.

The config is used as shipped, with only addresses, the listen port, the stats socket and the
Debian-specific process lines (log, chroot, user, group) rewritten for loopback.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
)
# 4 images with guidance: long enough on the demo pack for concurrent jobs to overlap
JOB = {"prompt": "a lighthouse at dusk", "batch_size": 4, "cfg_scale": 1.5, "seed": 5}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        HAPROXY is None,
        reason="haproxy is not installed here (Debian: apt-get install haproxy; .ci/run installs it as root)",
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render_config(template: str, servers: dict[str, int], port: int, stats_port: int, sock: Path) -> str:
    """deploy/haproxy.cfg for loopback: every `server <name> <addr>` pointed at 127.0.0.1:<port>."""
    text, n = re.subn(
        r"^(\s*server\s+)(\S+)(\s+)\S+",
        lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}127.0.0.1:{servers[m.group(2)]}",
        template,
        flags=re.M,
    )
    assert n == 2 * len(servers), "deploy/haproxy.cfg should list each node once per backend"
    text, n = re.subn(r"^(\s*bind\s+):7860\b", rf"\g<1>127.0.0.1:{port}", text, flags=re.M)
    assert n == 1, "the frontend should bind :7860"
    text, n = re.subn(r"stats socket \S+", f"stats socket {sock}", text)
    assert n == 1
    text = text.replace("bind 127.0.0.1:8404", f"bind 127.0.0.1:{stats_port}")
    text = re.sub(r"^\s*(chroot|user|group)\b.*\n", "", text, flags=re.M)
    return re.sub(r"^(\s*)log /dev/log\b.*$", r"\1log stdout format raw local0", text, flags=re.M)


def _stat(sock: Path) -> list[dict[str, str]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode().lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


def _server_status(sock: Path, backend: str, server: str) -> str:
    for row in _stat(sock):
        if row["pxname"] == backend and row["svname"] == server:
            return row["status"]
    raise KeyError(f"{backend}/{server}")


class Node:
    """One `pi-axera-sd serve --demo` process."""

    def __init__(self, name: str, port: int, cache: Path, tmp: Path):
        self.name, self.port = name, port
        self.log = tmp / f"{name}.log"
        cmd = [
            sys.executable, "-m", "pi_axera_sd_service", "serve", "--demo", "--port", str(port),
            "--cache-dir", str(cache), "--state-dir", str(tmp / name / "state"),
            "--output-dir", str(tmp / name / "out"), "--shutdown-timeout", "20",
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        pytest.fail(f"{self.name} not healthy after {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture()
def fleet(tmp_path):
    from pi_axera_sd_service.runtime.demo_pack import demo_pack_dir

    cache = tmp_path / "cache"
    demo_pack_dir(cache)  # build once, before two processes race for it
    nodes = {name: Node(name, _free_port(), cache, tmp_path) for name in ("pi1", "pi2")}
    haproxy = None
    try:
        for node in nodes.values():
            node.wait_healthy()
        port, sock = _free_port(), tmp_path / "haproxy.sock"
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(
            render_config(
                TEMPLATE.read_text(), {n: v.port for n, v in nodes.items()}, port, _free_port(), sock
            )
        )
        check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        hap_log = (tmp_path / "haproxy.log").open("wb")
        haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=hap_log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60  # bounds a hang only (HAProxy marks a node UP in ~4 s)
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/health", timeout=1).status_code == 200 and sock.exists():
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        # both nodes UP in HAProxy's eyes before the test starts
        while time.monotonic() < deadline and any(
            not _server_status(sock, "pi_sd_generate", n).startswith("UP") for n in nodes
        ):
            time.sleep(0.2)
        yield {"base": base, "nodes": nodes, "sock": sock}
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=10)
        for node in nodes.values():
            node.kill()


def _txt2img(base: str, seed: int) -> tuple[int, str, int]:
    """(status, node that answered, number of decodable 512x512 PNGs)."""
    r = requests.post(f"{base}/sdapi/v1/txt2img", json={**JOB, "seed": seed}, timeout=60)
    images = r.json().get("images", []) if r.status_code == 200 else []
    pngs = sum(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    return r.status_code, r.headers.get("X-Served-By", ""), pngs


def test_concurrent_requests_all_succeed_and_spread_over_both_nodes(fleet):
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _txt2img(fleet["base"], i), range(8)))
    assert [status for status, _, _ in results] == [200] * 8
    assert all(pngs == JOB["batch_size"] for _, _, pngs in results)
    served = [node for _, node, _ in results]
    assert set(served) == {"pi1", "pi2"}, f"all requests went to {set(served)}"
    # one job per node: HAProxy never had more than one request on a node at a time
    rows = {r["svname"]: r for r in _stat(fleet["sock"]) if r["pxname"] == "pi_sd_generate"}
    assert int(rows["pi1"]["smax"]) == 1 and int(rows["pi2"]["smax"]) == 1
    assert int(rows["BACKEND"]["qmax"]) >= 1, "the extra requests waited in HAProxy's queue"


def test_progress_calls_reach_the_node_that_ran_the_clients_job(fleet):
    for seed in range(3):
        status, node, _ = _txt2img(fleet["base"], seed)
        assert status == 200
        # two calls in a row: a round-robin balancer would send one of them to the other node
        for _ in range(2):
            progress = requests.get(f"{fleet['base']}/sdapi/v1/progress", timeout=5)
            assert progress.status_code == 200 and "state" in progress.json()
            assert progress.headers["X-Served-By"] == node


def test_stopping_a_node_mid_run_loses_no_request_and_health_check_takes_it_out(fleet):
    base, nodes, sock = fleet["base"], fleet["nodes"], fleet["sock"]
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_txt2img, base, i) for i in range(16)]
        # stop pi2 as soon as it has answered once: jobs are still waiting in HAProxy's queue
        done_pi2 = False
        for fut in cf.as_completed(futures):
            if fut.result()[1] == "pi2" and not done_pi2:
                nodes["pi2"].stop()
                done_pi2 = True
                stopped_at = time.monotonic()
        results = [f.result() for f in futures]
    assert done_pi2, "pi2 never served a request"
    assert [status for status, _, _ in results] == [200] * 16, results
    assert all(pngs == JOB["batch_size"] for _, _, pngs in results)
    assert nodes["pi2"].proc.wait(timeout=30) == 0, "a stopped node exits cleanly after its job"

    deadline = stopped_at + 60  # bounds a hang only (fall 2 x inter 2 s takes it out in ~4 s)
    while time.monotonic() < deadline and not _server_status(sock, "pi_sd_generate", "pi2").startswith(
        "DOWN"
    ):
        time.sleep(0.2)
    assert _server_status(sock, "pi_sd_generate", "pi2").startswith("DOWN")
    assert _server_status(sock, "pi_sd_generate", "pi1").startswith("UP")
    after = [_txt2img(base, 100 + i) for i in range(3)]
    assert after == [(200, "pi1", JOB["batch_size"])] * 3
