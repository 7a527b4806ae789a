"""Throughput and latency of 1, 4 and 16 concurrent clients with AX650N-like per-call delays.

The real app runs under uvicorn on 127.0.0.1 (ephemeral port) on the demo pack, with a session
wrapper sleeping the published AX650N times per call (upstream README logs: text encoder 10 ms,
UNet 437 ms per step, VAE decode 930 ms). The ideal throughput is one image per sum of NPU time.

    .venv/bin/python bench/bench_concurrency.py [--requests N] [--clients 1,4,16] [--steps 4]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from pi_axera_sd_service.api.app import create_app
from pi_axera_sd_service.runtime.demo_pack import make_demo_pack
from pi_axera_sd_service.runtime.session import Session
from pi_axera_sd_service.service.engine import Engine
from pi_axera_sd_service.settings import Settings

AX650N_DELAY_S = {"text_encoder": 0.010, "unet": 0.437, "vae_decoder": 0.930, "vae_encoder": 0.0}
DEFAULT_REQUESTS = {1: 4, 4: 12, 16: 16}


class NpuLikeSession:
    """Sleeps the AX650N time of its role, then runs the demo graph."""

    def __init__(self, inner: Session, delay_s: float):
        self.inner, self.delay_s = inner, delay_s
        self.path, self.backend = inner.path, inner.backend
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        time.sleep(self.delay_s)
        return self.inner.run(feed)


def npu_like(role: str, session: Session) -> Session:
    return NpuLikeSession(session, AX650N_DELAY_S.get(role, 0.0))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Server:
    """The app under uvicorn in a thread."""

    def __init__(self, settings: Settings):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.engine = Engine(settings, wrap=npu_like)
        config = uvicorn.Config(create_app(settings, self.engine), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise SystemExit("server failed to start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def run_level(url: str, clients: int, requests: int, steps: int) -> dict[str, float]:
    """`clients` threads send `requests` txt2img calls in total, back to back."""
    latencies: list[float] = []
    statuses: list[int] = []
    progress_ms: list[float] = []
    lock = threading.Lock()
    remaining = [requests]
    stop = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                body = {"prompt": f"a lighthouse, client {index}", "steps": steps, "cfg_scale": 1,
                        "seed": index}
                started = time.perf_counter()
                response = http.post(url + "/sdapi/v1/txt2img", json=body)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    statuses.append(response.status_code)

    def poll_progress() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                started = time.perf_counter()
                http.get(url + "/sdapi/v1/progress")
                progress_ms.append((time.perf_counter() - started) * 1000)
                time.sleep(0.2)

    poller = threading.Thread(target=poll_progress, daemon=True)
    poller.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    stop.set()
    poller.join()
    ok = statuses.count(200)
    return {"clients": clients, "requests": requests, "ok": ok, "wall_s": wall, "img_per_s": ok / wall,
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 95),
            "progress_p95_ms": percentile(progress_ms, 95), "errors": len(statuses) - ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default 4/12/16)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--steps", type=int, default=4, choices=[1, 2, 3, 4])
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",") if c.strip()]

    delay = AX650N_DELAY_S
    npu_s = delay["text_encoder"] + args.steps * delay["unet"] + delay["vae_decoder"]
    ideal = 1.0 / npu_s
    print(f"NPU time per image (AX650N, {args.steps} steps, no CFG): {npu_s * 1000:.0f} ms "
          f"-> ideal {ideal:.3f} img/s")
    with tempfile.TemporaryDirectory() as tmp:
        pack = make_demo_pack(Path(tmp) / "pack")
        settings = Settings(model_dir=pack, backend="onnxruntime", state_dir=Path(tmp) / "state",
                            cache_dir=Path(tmp) / "cache", max_queue=max(16, max(levels)), api_auth=None)
        with Server(settings) as server:
            print(f"{'clients':>7} {'reqs':>5} {'ok':>4} {'wall s':>7} {'img/s':>6} {'% ideal':>7} "
                  f"{'p50 s':>6} {'p95 s':>6} {'/progress p95 ms':>16}")
            for clients in levels:
                requests = args.requests or DEFAULT_REQUESTS.get(clients, 2 * clients)
                row = run_level(server.url, clients, max(requests, clients), args.steps)
                print(f"{row['clients']:>7} {row['requests']:>5} {row['ok']:>4} {row['wall_s']:>7.1f} "
                      f"{row['img_per_s']:>6.3f} {100 * row['img_per_s'] / ideal:>6.1f}% "
                      f"{row['p50_s']:>6.2f} {row['p95_s']:>6.2f} {row['progress_p95_ms']:>16.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
