"""Throughput and latency on 1, 2 and 4 simulated NPUs, with 4 clients per device and AX650N delays.

The real app runs under uvicorn on 127.0.0.1 (ephemeral port) on the demo pack with DEVICE_IDS
0..N-1 (one worker thread and one session set per device), with a session wrapper sleeping the
published AX650N times per call (upstream README logs: text encoder 10 ms, UNet 437 ms per step, VAE
decode 930 ms). The ideal throughput is N images per sum of NPU time (2.688 s at 4 steps); with
4N closed-loop clients a FIFO queue makes every request wait for the 4N-1 before it, so the FIFO
latency is 4 × 2.688 s whatever N. The targets: throughput >= 0.97 × ideal, max latency <= 1.05 × FIFO.

    .venv/bin/python bench/bench_concurrency.py [--devices 1,2,4] [--clients-per-device 4]
        [--requests-per-client 2] [--steps 4] [--batch 1]
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
THROUGHPUT_TARGET = 0.97   # of the ideal N / NPU time
LATENCY_TARGET = 1.05      # max latency over the FIFO bound


class NpuLikeSession:
    """Takes the AX650N time of its role per call: runs the demo graph, then sleeps the rest (the
    graph's own CPU time is not added on top: on the NPU the call is the whole time)."""

    def __init__(self, inner: Session, delay_s: float):
        self.inner, self.delay_s = inner, delay_s
        self.path, self.backend = inner.path, inner.backend
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        started = time.perf_counter()
        outputs = self.inner.run(feed)
        time.sleep(max(0.0, self.delay_s - (time.perf_counter() - started)))
        return outputs


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


def run_level(url: str, clients: int, requests: int, steps: int, batch: int = 1) -> dict[str, float]:
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
                        "seed": index, "batch_size": batch}
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
    return {"clients": clients, "requests": requests, "ok": ok, "wall_s": wall,
            "img_per_s": ok * batch / wall, "p50_s": statistics.median(latencies),
            "max_s": max(latencies), "progress_p95_ms": percentile(progress_ms, 95),
            "errors": len(statuses) - ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
    parser.add_argument("--clients-per-device", type=int, default=4)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, choices=[1, 2, 3, 4])
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",") if c.strip()]

    delay = AX650N_DELAY_S
    npu_s = args.batch * (delay["text_encoder"] + args.steps * delay["unet"] + delay["vae_decoder"])
    print(f"NPU time per request (AX650N, {args.steps} steps, no CFG, {args.batch} image(s)): "
          f"{npu_s * 1000:.0f} ms; {args.clients_per_device} clients per device")
    print(f"{'devices':>7} {'clients':>7} {'reqs':>5} {'ok':>4} {'wall s':>7} {'img/s':>6} {'ideal':>6} "
          f"{'% ideal':>7} {'p50 s':>6} {'max s':>6} {'FIFO s':>6} {'max/FIFO':>8} {'/progress p95 ms':>16}")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        pack = make_demo_pack(Path(tmp) / "pack")
        for devices in counts:
            clients = args.clients_per_device * devices
            settings = Settings(model_dir=pack, backend="onnxruntime", state_dir=Path(tmp) / "state",
                                cache_dir=Path(tmp) / "cache", max_queue=max(16, clients), api_auth=None,
                                device_ids=",".join(str(i) for i in range(devices)))
            with Server(settings) as server:
                run_level(server.url, devices, devices, args.steps, args.batch)   # warm-up, one per device
                requests = clients * args.requests_per_client
                row = run_level(server.url, clients, requests, args.steps, args.batch)
            ideal = devices * args.batch / npu_s
            fifo_s = npu_s * args.clients_per_device
            share, ratio = row["img_per_s"] / ideal, row["max_s"] / fifo_s
            failed |= share < THROUGHPUT_TARGET or ratio > LATENCY_TARGET or row["errors"] > 0
            print(f"{devices:>7} {clients:>7} {row['requests']:>5} {row['ok']:>4} {row['wall_s']:>7.1f} "
                  f"{row['img_per_s']:>6.3f} {ideal:>6.3f} {100 * share:>6.1f}% {row['p50_s']:>6.2f} "
                  f"{row['max_s']:>6.2f} {fifo_s:>6.2f} {ratio:>8.3f} {row['progress_p95_ms']:>16.1f}")
    print(f"targets: throughput >= {THROUGHPUT_TARGET:.2f} x ideal, "
          f"max latency <= {LATENCY_TARGET:.2f} x FIFO: " + ("missed (see the rows)" if failed else "met"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
