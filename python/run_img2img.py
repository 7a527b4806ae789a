"""img2img with the upstream script's flags (`python/run_img2img_axe_infer.py`), on this package.

Same flags and defaults as upstream (`--save_dir` is a PNG file path; no side-by-side grid is written),
plus `--seed` (default 0, as upstream's `torch.manual_seed(0)`), `--denoising_strength` (default 0.5:
timesteps 499 and 259, the upstream schedule), `--backend` and `--demo` (the generated CPU demo pack;
without `--init_image` it uses a built-in test picture). Model files not given come from `./models`.
The four-row `time_input_txt2img.npy` drives both modes; a `--time_input .../time_input_img2img.npy`
(two rows, then zeros) is swapped for the txt2img file next to it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pi_axera_sd_service.cli import run_reporting_errors  # noqa: E402
from pi_axera_sd_service.oneshot import (  # noqa: E402
    add_upstream_arguments,
    generate_image,
    print_result,
    upstream_settings,
)
from pi_axera_sd_service.service.request import UPSTREAM_DENOISING_STRENGTH  # noqa: E402

DEFAULT_INIT_IMAGE = "./models/img2img-init.png"
DEFAULT_PROMPT = "Astronauts in a jungle, cold color palette, muted colors, detailed, 8k"


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The upstream flags plus --seed, --denoising_strength, --backend, --demo."""
    p = argparse.ArgumentParser(prog="run_img2img.py", description=__doc__.splitlines()[0])
    add_upstream_arguments(p, prompt=DEFAULT_PROMPT, save_dir="./img2img_output_axe.png", img2img=True)
    p.add_argument("--init_image", default=None, help=f"init image (default {DEFAULT_INIT_IMAGE})")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0, as upstream; -1: random)")
    p.add_argument("--denoising_strength", type=float, default=UPSTREAM_DENOISING_STRENGTH,
                   help=f"0.25/0.5/0.75/1 run 1/2/3/4 steps (default {UPSTREAM_DENOISING_STRENGTH:g})")
    return p.parse_args(argv)


def _test_picture(folder: Path) -> Path:
    """A colourful 512x512 gradient, for --demo without an init image."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:512, 0:512].astype(np.float32) / 511
    rgb = np.stack([x, y, 1 - (x + y) / 2], axis=-1)
    path = folder / "demo-init.png"
    Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB").save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Generate one image from the init image and print the seed, timings and path."""
    args = get_args(argv)

    def run() -> int:
        settings = upstream_settings(args)
        with tempfile.TemporaryDirectory() as tmp:
            init = Path(args.init_image or DEFAULT_INIT_IMAGE)
            if args.demo and args.init_image is None and not init.exists():
                init = _test_picture(Path(tmp))
            result = generate_image(
                settings,
                prompt=args.prompt,
                seed=args.seed,
                init_image=init,
                denoising_strength=args.denoising_strength,
                output=Path(args.save_dir),
            )
        print_result(result)
        return 0

    return run_reporting_errors(run, prog="run_img2img.py")


if __name__ == "__main__":
    sys.exit(main())
