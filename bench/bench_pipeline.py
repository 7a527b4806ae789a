"""Per-stage time breakdown (ms, median of N runs) of demo-pack txt2img and img2img on the CPU.

Run: .venv/bin/python bench/bench_pipeline.py [--runs 5] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pi_axera_sd_service.pipeline.generate import ImageJob, Pipeline
from pi_axera_sd_service.pipeline.images import encode_image
from pi_axera_sd_service.pipeline.scheduler import img2img_timesteps, txt2img_timesteps
from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer
from pi_axera_sd_service.runtime.demo_pack import demo_pack_dir
from pi_axera_sd_service.runtime.model_dir import load_models, resolve_model_files

PROMPT = "a beautiful landscape with mountains and a lake at sunset, highly detailed"


def _case_jobs(pipeline: Pipeline) -> dict[str, ImageJob]:
    base = dict(prompt=PROMPT, negative_prompt="", seed=1, subseed=0, subseed_strength=0.0, init_image=None)
    init = pipeline.generate(ImageJob(**base, timesteps=txt2img_timesteps(4), cfg_scale=1.0)).image
    return {
        "txt2img 4 steps cfg 1": ImageJob(**base, timesteps=txt2img_timesteps(4), cfg_scale=1.0),
        "txt2img 4 steps cfg 1.5": ImageJob(**{**base, "negative_prompt": "blurry"},
                                            timesteps=txt2img_timesteps(4), cfg_scale=1.5),
        "img2img strength 0.5": ImageJob(**{**base, "init_image": init},
                                         timesteps=img2img_timesteps(0.5), cfg_scale=1.0),
    }


def _run_case(pipeline: Pipeline, job: ImageJob, runs: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        start = time.perf_counter()
        out = pipeline.generate(job)
        generate_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        encode_image(out.image, "png", "bench")
        png_ms = (time.perf_counter() - start) * 1000
        for key, value in {**out.timings_ms, "generate (all)": generate_ms, "png encode": png_ms}.items():
            samples.setdefault(key, []).append(value)
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=None, help="demo pack cache (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pack = demo_pack_dir(args.cache_dir or Path(tmp))
        models = load_models(*resolve_model_files(model_dir=pack, backend="onnxruntime"))
        pipeline = Pipeline(models, ClipTokenizer.from_dir(models.tokenizer_dir))
        print(f"demo pack + load: {(time.perf_counter() - start) * 1000:.0f} ms; "
              f"image {models.image_size[0]}x{models.image_size[1]}, median of {args.runs} runs\n")
        for name, job in _case_jobs(pipeline).items():
            pipeline.generate(job)  # warm-up
            medians = _run_case(pipeline, job, args.runs)
            print(name)
            for key in sorted(medians, key=_order):
                print(f"  {key:<16} {medians[key]:9.2f} ms")
            print()


def _order(key: str) -> tuple[int, str]:
    ranks = ["text", "vae_encode", "unet_step", "unet_total", "vae_decode", "generate", "png"]
    return next((i for i, prefix in enumerate(ranks) if key.startswith(prefix)), len(ranks)), key


if __name__ == "__main__":
    main()
