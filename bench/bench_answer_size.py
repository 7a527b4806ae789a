"""Size of the POST /generate answer (bytes on the wire) for one and for two demo-pack images.

"before" is the answer as it was until `images` became opt-in for one image: the same answer with
`return_images: true` (every image both in `base64` and in `images`).

Run: .venv/bin/python bench/bench_answer_size.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from pi_axera_sd_service.api.app import create_app
from pi_axera_sd_service.runtime.demo_pack import demo_pack_dir
from pi_axera_sd_service.service.engine import Engine
from pi_axera_sd_service.settings import Settings

BODY = {"mode": "txt2img", "prompt": "a lighthouse on a cliff at sunset, oil painting", "seed": 42}
CASES: list[tuple[str, dict[str, Any]]] = [
    ("1 image (now)", BODY),
    ("1 image, before (= return_images)", {**BODY, "return_images": True}),
    ("2 images", {**BODY, "batch_size": 2}),
]


def measure(client: TestClient, body: dict[str, Any]) -> tuple[int, int]:
    """(answer bytes, total length of the distinct base64 images in it)."""
    resp = client.post("/generate", json=body)
    resp.raise_for_status()
    data = resp.json()
    images = data.get("images") or [data["base64"]]
    return len(resp.content), sum(len(b64) for b64 in images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="demo pack cache (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(
            model_dir=demo_pack_dir(args.cache_dir or root / "cache"), backend="onnxruntime",
            state_dir=root / "state", output_dir=root / "out", cache_dir=root / "cache", api_auth=None,
        )
        with TestClient(create_app(settings, Engine(settings))) as client:
            print(f"{'case':<36} {'answer':>11} {'base64 PNGs':>12} {'answer / PNGs':>14}")
            for name, body in CASES:
                answer, pngs = measure(client, body)
                print(f"{name:<36} {answer:>9,} B {pngs:>10,} B {answer / pngs:>13.3f}")


if __name__ == "__main__":
    main()
