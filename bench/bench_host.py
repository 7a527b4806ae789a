"""Server CPU per image: the host-side cost of one request, measured on the real server process.

Starts `python -m pi_axera_sd_service serve --demo` (as bench_memory.py does), warms it up, then
sends `--requests` requests of each kind one after the other and reads the server's CPU time
(utime + stime of /proc/<pid>/stat, all threads) before and after: CPU ms per image. The kinds:
`/sdapi/v1/txt2img` (one image, 4 steps) and `/generate` img2img (strength 0.5) with a 512×512 and
a 1024×768 PNG init image (noisy gradients, as bench_memory.py sends).

The demo graphs' own compute (≈7 ms per image here, see bench_pipeline.py) is part of the figure;
everything else is the service: HTTP, JSON, base64, init image decode/resize, PNG encode.
x86 figures: a Cortex-A76 (Pi 5) is unmeasured.

    .venv/bin/python bench/bench_host.py [--requests 40] [--warmup 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from bench_memory import free_port, init_image_b64, wait_ready

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cases() -> dict[str, tuple[str, dict]]:
    """txt2img, and img2img with a 512×512 init (the model size) and a 1024×768 one (resized)."""
    img2img = {"mode": "img2img", "prompt": "a watercolor fox", "strength": 0.5, "seed": 3}
    return {
        "/sdapi/v1/txt2img": ("/sdapi/v1/txt2img",
                              {"prompt": "a lighthouse at dusk", "steps": 4, "cfg_scale": 1, "seed": 2}),
        "/generate img2img 512x512": ("/generate", {**img2img, "init_image": init_image_b64(512, 512)}),
        "/generate img2img 1024x768": ("/generate", {**img2img, "init_image": init_image_b64(1024, 768)}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=40, help="measured requests per kind (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured requests per kind first (default 5)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_host_") as tmp:
        port = free_port()
        cmd = [sys.executable, "-m", "pi_axera_sd_service", "serve", "--demo", "--port", str(port),
               "--cache-dir", f"{tmp}/cache", "--state-dir", f"{tmp}/state", "--output-dir", f"{tmp}/out",
               "--log-level", "WARNING"]
        with open(f"{tmp}/server.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                    wait_ready(client, proc)
                    for name, (path, body) in cases().items():
                        for _ in range(args.warmup):
                            client.post(path, json=body).raise_for_status()
                        before = cpu_seconds(proc.pid)
                        for _ in range(args.requests):
                            client.post(path, json=body).raise_for_status()
                        per_image = (cpu_seconds(proc.pid) - before) * 1000 / args.requests
                        print(f"{name:<28} server CPU {per_image:6.1f} ms per image "
                              f"({args.requests} requests)")
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
