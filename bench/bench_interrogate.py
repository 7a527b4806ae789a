"""CPU time of interrogation around the NPU calls (ms, median of N runs), on the demo pack.

Measures decode, preprocessing (224 crop), the demo vision call, scoring against a tag list the size of
upstream's (20,101 random unit vectors), a structured request's classification, and the tag-cache
build per label on the demo text model; then the server time per call of both routes over HTTP (the
real app under uvicorn on 127.0.0.1, demo pack: decode, queue, worker, JSON). The demo graphs do almost
no work: NPU time is upstream's estimate (vision 30-50 ms, text ~4 ms per label).

Run: .venv/bin/python bench/bench_interrogate.py [--runs 20]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from bench_concurrency import Server
from PIL import Image

from pi_axera_sd_service.pipeline.clip import classify, general_tags, pick_tags, preprocess
from pi_axera_sd_service.pipeline.images import decode_image_b64
from pi_axera_sd_service.pipeline.interrogator import InterrogationLimits, Interrogator
from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer
from pi_axera_sd_service.runtime.clip_models import load_clip_models, resolve_clip_files
from pi_axera_sd_service.runtime.demo_pack import demo_pack_dir
from pi_axera_sd_service.settings import Settings

UPSTREAM_TAGS = 20_101
PICKER_CATEGORIES = {"Colour": ["red", "green", "blue", "yellow"], "Animal": ["cat", "dog"],
                     "Place": ["forest", "ocean", "mountain", "house"]}


def median_ms(func: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "pi_axera_sd_bench")
    args = parser.parse_args()
    pack = demo_pack_dir(args.cache_dir)
    models = load_clip_models(resolve_clip_files("onnxruntime", model_dir=pack), "onnxruntime")
    with tempfile.TemporaryDirectory() as cache:
        limits = InterrogationLimits.from_settings(Settings())
        tokenizer = ClipTokenizer.from_dir(pack / "tokenizer")
        interrogator = Interrogator(models, tokenizer, Path(cache), limits, lru_size=64)
        build_ms = median_ms(lambda: interrogator.encoder.embed_labels(["a small red house"]), args.runs)
        interrogator.index.build_all()
        rng = np.random.default_rng(0)
        photo = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), "RGB")
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG", compress_level=1)
        b64 = base64.b64encode(buffer.getvalue()).decode()
        big = photo.resize((4000, 3000))
        tags = rng.normal(0, 1, (UPSTREAM_TAGS, 512)).astype(np.float32)
        tags /= np.linalg.norm(tags, axis=1, keepdims=True)
        labels = [f"tag {i}" for i in range(UPSTREAM_TAGS)]
        image_embedding = interrogator.encoder.embed_image(photo)

        def score_upstream_list() -> None:
            scores = tags @ image_embedding
            pick_tags(scores, labels, 0.22, 10)
            general_tags(scores, labels, 0.2, 10)

        rows = {
            "decode 512x512 PNG (base64)": median_ms(lambda: decode_image_b64(b64, 40_000_000), args.runs),
            "preprocess 512x512": median_ms(lambda: preprocess(photo), args.runs),
            "preprocess 4000x3000": median_ms(lambda: preprocess(big), max(3, args.runs // 4)),
            "embed image (demo vision + projection)": median_ms(
                lambda: interrogator.encoder.embed_image(photo), args.runs),
            f"score {UPSTREAM_TAGS} tags (cosine, top-k, general)": median_ms(score_upstream_list, args.runs),
            "classify 6 categories x 8 labels": median_ms(
                lambda: [classify(image_embedding, tags[:8], labels[:8]) for _ in range(6)], args.runs),
            "interrogate (demo, all CPU work)": median_ms(lambda: interrogator.interrogate(photo), args.runs),
            "tag-cache build per label (demo text)": build_ms,
        }
    rows.update(http_rows(b64, args.runs, args.cache_dir))
    width = max(map(len, rows))
    for name, value in rows.items():
        print(f"{name:<{width}}  {value:8.2f} ms")
    print(f"NPU estimate per /interrogate (upstream): vision 30-50 ms + the CPU rows above; tag cache "
          f"{UPSTREAM_TAGS} x ~4 ms = ~{UPSTREAM_TAGS * 4 / 1000:.0f} s once")


def http_rows(b64: str, runs: int, cache_dir: Path) -> dict[str, float]:
    """Median time per call of both routes over HTTP on a demo server, once its tag cache is built."""
    settings = Settings(demo=True, cache_dir=cache_dir, api_auth=None, state_dir=cache_dir / "state",
                        output_dir=cache_dir / "out")
    with Server(settings) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        while True:
            status = http.get("/capabilities").json()["interrogate"]
            if not status["available"]:
                raise SystemExit(f"interrogation is off: {status['reason']}")
            if status["tags_prepared"] == status["tags"]:
                break
            time.sleep(0.05)

        def call(path: str, body: dict) -> None:
            response = http.post(path, json=body)
            response.raise_for_status()

        structured = {"image": b64, "categories": PICKER_CATEGORIES}
        return {
            "HTTP /sdapi/v1/interrogate (512x512 PNG)": median_ms(
                lambda: call("/sdapi/v1/interrogate", {"image": b64}), runs),
            "HTTP /interrogate/structured (picker, 3 categories)": median_ms(
                lambda: call("/sdapi/v1/interrogate/structured", structured), runs),
        }


if __name__ == "__main__":
    main()
