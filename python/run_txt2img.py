"""txt2img with the upstream script's flags (`python/run_txt2img_axe_infer.py`), on this package.

Same flags and defaults as upstream (`--save_dir` is a PNG file path), plus `--seed`, `--backend` and
`--demo` (the generated CPU demo pack, no models needed). Model files not given on the command line
come from `./models` (`.axmodel` with axengine, `.onnx` with onnxruntime).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pi_axera_sd_service.cli import run_reporting_errors  # noqa: E402
from pi_axera_sd_service.oneshot import (  # noqa: E402
    add_upstream_arguments,
    generate_image,
    print_result,
    upstream_settings,
)

DEFAULT_PROMPT = "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k"


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The upstream flags plus --seed, --backend, --demo."""
    p = argparse.ArgumentParser(prog="run_txt2img.py", description=__doc__.splitlines()[0])
    add_upstream_arguments(p, prompt=DEFAULT_PROMPT, save_dir="./txt2img_output_axe.png")
    p.add_argument("--seed", type=int, default=-1, help="seed (-1: random, as upstream's unseeded noise)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate one image and print the seed, timings and path."""
    args = get_args(argv)

    def run() -> int:
        settings = upstream_settings(args)
        print_result(generate_image(settings, prompt=args.prompt, seed=args.seed, output=Path(args.save_dir)))
        return 0

    return run_reporting_errors(run, prog="run_txt2img.py")


if __name__ == "__main__":
    sys.exit(main())
