"""Host memory (RSS) of the real server process across many mixed requests, on the demo pack.

Starts `python -m pi_axera_sd_service serve --demo` as a subprocess on a free 127.0.0.1 port, reads
its VmRSS / VmHWM from /proc/<pid>/status after start-up, then sends N requests (default 200) in a
fixed rotation: `/generate` txt2img, `/sdapi/v1/txt2img` with batch_size 2, `/sdapi/v1/img2img` with a
1024×768 init image (resized to 512×512 by the service). It prints the RSS after every `--every`
requests, the growth, and the peak (VmHWM).

    .venv/bin/python bench/bench_memory.py [--requests 200] [--every 50]
    .venv/bin/python bench/bench_memory.py --worst [--requests 60]

`--worst` sends a barrage of the worst *small* requests instead (issue 13, class 5): 500 tiny init
images, a 4 KiB JPEG whose header claims 6000×6000, four 4000×4000 PNGs of a few KiB each, a body
nested 100,000 deep, a 5,000-digit number. It prints the peak and the settled RSS (2 s after the
last request) and checks the peak growth against WORST_BOUND_MIB (exit status 1 beyond it).

What the numbers mean: on the demo pack the models are tiny ONNX graphs run by onnxruntime in the
server process, so the RSS is the service (Python, FastAPI, numpy, Pillow, onnxruntime) plus the
per-request buffers. On the Pi with the AX650N card the compiled models live in the card's CMM
(device memory, see `axcl-smi`), not in host RAM, so host RSS there is the service plus the AXCL
runtime's host-side overhead, comparable to what this prints; it is not the model size.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def mib(kib: int) -> str:
    return f"{kib / 1024:7.1f} MiB"


def init_image_b64(width: int = 1024, height: int = 768) -> str:
    """A 1024×768 PNG (gradient + noise, so it does not compress to nothing)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    rgb = np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def requests_cycle(init_b64: str) -> list[tuple[str, str, dict]]:
    """The three kinds of request, sent in this order over and over."""
    return [
        ("generate txt2img", "/generate", {"mode": "txt2img", "prompt": "a red fox in the snow", "seed": 1}),
        (
            "sdapi txt2img batch 2",
            "/sdapi/v1/txt2img",
            {"prompt": "a lighthouse at dusk", "steps": 4, "cfg_scale": 1, "seed": 2, "batch_size": 2},
        ),
        (
            "sdapi img2img 1024x768 init",
            "/sdapi/v1/img2img",
            {"prompt": "a watercolor fox", "init_images": [init_b64], "denoising_strength": 0.5, "seed": 3},
        ),
    ]


# Peak RSS growth the worst small requests may cause: one request's decoded pixels at the default
# max_request_pixels (50 M) are 150 MB as RGB; the decode and the RGB copy may briefly coexist.
WORST_BOUND_MIB = 2 * 50_000_000 * 3 / 2**20 + 100  # + 100 MiB warm-up (first requests, allocator pools)


def png_b64_of_size(width: int, height: int) -> str:
    """A PNG of one colour: a few KiB on the wire, width×height pixels when decoded."""
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG", compress_level=9)
    return base64.b64encode(buf.getvalue()).decode()


def jpeg_b64_claiming(width: int, height: int) -> str:
    """A ~1 KiB JPEG whose frame header claims width×height (its data is a 64×64 image's)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="JPEG", quality=50)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return base64.b64encode(bytes(data)).decode()


def worst_cycle() -> list[tuple[str, str, dict | bytes]]:
    """Small requests that cost the most memory when handled naively."""
    tiny = png_b64_of_size(64, 64)
    big = png_b64_of_size(4000, 4000)
    claiming = jpeg_b64_claiming(6000, 6000)
    img2img = {"prompt": "p", "steps": 1, "cfg_scale": 1, "denoising_strength": 0.5}
    long_number = b'{"mode": "txt2img", "prompt": "p", "steps": 1' + b"0" * 5000 + b"}"
    return [
        ("500 tiny init images", "/sdapi/v1/img2img", {**img2img, "init_images": [tiny] * 500}),
        ("JPEG claiming 6000x6000", "/sdapi/v1/img2img", {**img2img, "init_images": [claiming]}),
        ("4 x 4000x4000 PNG, batch 4", "/sdapi/v1/img2img",
         {**img2img, "init_images": [big] * 4, "batch_size": 4}),
        ("body nested 100,000 deep", "/generate", b'{"a": ' * 100_000),
        ("5,000-digit number", "/generate", long_number),
    ]


def run_worst(client: httpx.Client, pid: int, requests: int) -> int:
    """The barrage; prints peak and settled RSS against WORST_BOUND_MIB; 1 when the bound is passed."""
    start = memory_kib(pid)
    print(f"after start:        RSS {mib(start['VmRSS'])}   peak {mib(start['VmHWM'])}")
    cycle = worst_cycle()
    statuses: dict[str, set[int]] = {}
    for i in range(requests):
        name, path, body = cycle[i % len(cycle)]
        if isinstance(body, bytes):
            resp = client.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            resp = client.post(path, json=body)
        statuses.setdefault(name, set()).add(resp.status_code)
    peak = memory_kib(pid)["VmHWM"]
    time.sleep(2.0)
    settled = memory_kib(pid)["VmRSS"]
    for name, codes in statuses.items():
        print(f"  {name:30s} HTTP {sorted(codes)}")
    growth = (peak - start["VmRSS"]) / 1024
    print(f"{requests} worst small requests: peak RSS {mib(peak)} ({growth:+.1f} MiB), "
          f"settled RSS {mib(settled)} ({(settled - start['VmRSS']) / 1024:+.1f} MiB)")
    verdict = "ok" if growth <= WORST_BOUND_MIB else "EXCEEDED"
    print(f"bound: peak growth <= {WORST_BOUND_MIB:.0f} MiB -> {verdict}")
    server_errors = [name for name, codes in statuses.items() if any(code >= 500 for code in codes)]
    if server_errors:
        print(f"5xx answers: {server_errors}")
    return 1 if growth > WORST_BOUND_MIB or server_errors else 0


def wait_ready(client: httpx.Client, proc: subprocess.Popen, timeout_s: float = 120.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready")
        try:
            if client.get("/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready after {timeout_s:.0f} s")


@contextlib.contextmanager
def demo_server(tmp: str, *extra_args: str) -> Iterator[tuple[subprocess.Popen, httpx.Client, float]]:
    """`serve --demo` as a subprocess on a free 127.0.0.1 port with its folders and log in `tmp`:
    (process, a client on it, seconds until /health answered); SIGTERM (then kill) on exit."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "pi_axera_sd_service", "serve", "--demo", "--port", str(port),
        "--cache-dir", f"{tmp}/cache", "--state-dir", f"{tmp}/state", "--output-dir", f"{tmp}/out",
        *extra_args,
    ]  # fmt: skip
    with open(f"{tmp}/server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                yield proc, client, wait_ready(client, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="number of requests (default 200)")
    p.add_argument("--every", type=int, default=50, help="print RSS after every N requests (default 50)")
    p.add_argument("--worst", action="store_true", help="the barrage of worst small requests instead")
    args = p.parse_args(argv)
    if not Path("/proc/self/status").exists():
        raise SystemExit("needs Linux /proc")

    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp, \
            demo_server(tmp) as (proc, client, ready_s):
        if args.worst:
            return run_worst(client, proc.pid, args.requests)
        start = memory_kib(proc.pid)
        print(f"server pid {proc.pid} on port {client.base_url.port}, ready after {ready_s:.1f} s "
              "(demo pack, CPU)")
        print(f"after start:        RSS {mib(start['VmRSS'])}   peak {mib(start['VmHWM'])}")
        cycle = requests_cycle(init_image_b64())
        failures: dict[str, int] = {}
        rows: list[tuple[int, int]] = [(0, start["VmRSS"])]
        t0 = time.perf_counter()
        for i in range(args.requests):
            name, path, body = cycle[i % len(cycle)]
            resp = client.post(path, json=body)
            if resp.status_code != 200:
                key = f"{name}: HTTP {resp.status_code}"
                failures[key] = failures.get(key, 0) + 1
            done = i + 1
            if done % args.every == 0 or done == args.requests:
                now = memory_kib(proc.pid)
                rows.append((done, now["VmRSS"]))
                print(
                    f"after {done:4d} requests: RSS {mib(now['VmRSS'])}   "
                    f"growth since start {(now['VmRSS'] - start['VmRSS']) / 1024:+7.1f} MiB   "
                    f"peak {mib(now['VmHWM'])}"
                )
        elapsed = time.perf_counter() - t0
        end = memory_kib(proc.pid)

    images = sum(2 if "batch 2" in cycle[i % 3][0] else 1 for i in range(args.requests))
    print()
    print(f"{args.requests} requests ({images} images) in {elapsed:.1f} s; failures: {failures or 'none'}")
    print(f"RSS after start      {mib(start['VmRSS'])}")
    print(f"RSS at the end       {mib(end['VmRSS'])}   ({(end['VmRSS'] - start['VmRSS']) / 1024:+.1f} MiB)")
    if len(rows) > 2:  # growth after the first checkpoint: warm-up (allocator pools, caches) excluded
        (n1, r1), (n2, r2) = rows[1], rows[-1]
        print(
            f"growth after warm-up {(r2 - r1) / 1024:+.1f} MiB from request {n1} to {n2} "
            f"({(r2 - r1) / max(n2 - n1, 1):+.1f} KiB per request)"
        )
    print(f"peak RSS (VmHWM)     {mib(end['VmHWM'])}")
    print(
        "These are host numbers of the demo pack on the CPU. On the Pi the NPU models live in the "
        "AX650N card's CMM (axcl-smi shows it), so host RSS there is the service plus runtime overhead."
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
