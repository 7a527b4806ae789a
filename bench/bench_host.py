"""Server CPU per image: the host-side cost of one request, measured on the real server process.

Starts `python -m pi_axera_sd_service serve --demo` (as bench_memory.py does), warms it up with
`--warmup` requests of each kind in turn (the server's heap grows to its working set over the
first requests; after that a request reuses warm memory), then measures `--rounds` rounds: in each,
`--requests` requests of each kind one after the other, reading the server's CPU time (utime +
stime of /proc/<pid>/stat, all threads) before and after. It prints min, median and max over the
rounds of CPU ms per image. The kinds: `/sdapi/v1/txt2img` (one image, 4 steps) and `/generate`
img2img (strength 0.5) with a 512×512 and a 1024×768 PNG init image (noisy gradients, as
bench_memory.py sends).

The demo graphs' own compute (≈4 ms per image here, see bench_pipeline.py) is part of the figure;
everything else is the service: HTTP, JSON, base64, init image decode/resize, PNG encode.
x86 figures: a Cortex-A76 (Pi 5) is unmeasured.

    .venv/bin/python bench/bench_host.py [--requests 40] [--rounds 3] [--warmup 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench_memory import demo_server, init_image_b64

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
    p.add_argument("--requests", type=int, default=40, help="requests per kind and round (default 40)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds over the kinds (default 3)")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured requests per kind first (default 20)")
    args = p.parse_args(argv)
    kinds = cases()
    per_image: dict[str, list[float]] = {name: [] for name in kinds}
    with tempfile.TemporaryDirectory(prefix="bench_host_") as tmp, \
            demo_server(tmp, "--log-level", "WARNING") as (proc, client, _):
        for _ in range(args.warmup):
            for path, body in kinds.values():
                client.post(path, json=body).raise_for_status()
        for _ in range(args.rounds):
            for name, (path, body) in kinds.items():
                before = cpu_seconds(proc.pid)
                for _ in range(args.requests):
                    client.post(path, json=body).raise_for_status()
                per_image[name].append((cpu_seconds(proc.pid) - before) * 1000 / args.requests)
    print(f"server CPU per image, ms ({args.rounds} rounds x {args.requests} requests per kind, "
          f"after {args.warmup} of each kind)")
    print(f"{'':28} {'min':>6} {'median':>7} {'max':>6}")
    for name, values in per_image.items():
        print(f"{name:<28} {min(values):6.1f} {statistics.median(values):7.1f} {max(values):6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
