"""One image without HTTP: `pi-axera-sd generate` and `python/run_*.py`.

The service's path without the queue: `from_cli` -> CapabilityTable.apply -> GenerationPlan ->
JobRunner (Pipeline) -> encode_images, so the same input gives the same pixels, warnings and
infotext as POST /generate. The upstream scripts' flags (`add_upstream_arguments`) and their
translation to Settings (`upstream_settings`) live here too, so both scripts share them.
Imports point downward only: this module uses settings, service, pipeline and runtime, never the CLI.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pi_axera_sd_service.settings import Settings, cli_flag, env_name

UPSTREAM_BACKENDS = {"axe": "axengine", "onnx": "onnxruntime"}  # upstream launcher.py's names
CLI_FLAGS = {"mode": "--init-image", "init_images": "--init-image"}  # request fields named otherwise


class CliError(Exception):
    """A user error: the command line prints it as one line and exits with status 1."""


def settings_error(exc: ValidationError) -> CliError:
    """One line naming each bad setting by its environment name and flag, with the value given."""
    problems = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        name = f"{env_name(field)} / {cli_flag(field)}" if field in Settings.model_fields else "settings"
        given = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        problems.append(f"{name}: {err['msg']}{given}")
    return CliError("invalid setting " + "; ".join(problems))


def resolve_files(settings: Settings, model_dir: Path | None = None) -> tuple[Any, str]:
    """(ModelFiles, backend) for the configured models, an explicit folder, or the demo pack."""
    from pi_axera_sd_service.runtime.model_dir import resolve_model_files
    from pi_axera_sd_service.service.engine import configured_model_files

    if model_dir is not None:
        return resolve_model_files(model_dir=model_dir, backend=settings.backend)
    return configured_model_files(settings)


# --------------------------------------------------------------------------- one generation


@dataclass
class GenerateResult:
    """What a one-shot generation reports."""

    path: Path
    seed: int
    timings_ms: dict[str, float]   # load_models, the pipeline's keys, image_encode, total
    warnings: list[str]
    mode: str                      # "txt2img" | "img2img"


def read_init_image(path: Path, max_pixels: int) -> Any:
    """The init image file as an RGB PIL image; a CliError naming the file otherwise."""
    from pi_axera_sd_service.pipeline.images import ImageDecodeError, decode_image_bytes

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read init image {path}: {exc.strerror or exc}") from None
    try:
        return decode_image_bytes(raw, max_pixels)
    except ImageDecodeError as exc:
        raise CliError(f"init image {path}: {exc}") from None


def generate_image(
    settings: Settings,
    *,
    output: Path,
    init_image: Path | None = None,
    files: tuple[Any, str] | None = None,
    **request_fields: Any,
) -> GenerateResult:
    """One txt2img (or img2img with `init_image`) through the capability table and the pipeline,
    written as a PNG carrying the A1111 infotext. `request_fields` are `from_cli`'s (prompt, seed,
    steps, ...); None (or a negative seed) means the service's default.
    """
    from pi_axera_sd_service.service.capabilities import CapabilityTable
    from pi_axera_sd_service.service.errors import RequestError
    from pi_axera_sd_service.service.options import CheckpointInfo
    from pi_axera_sd_service.service.progress import ProgressState
    from pi_axera_sd_service.service.request import from_cli
    from pi_axera_sd_service.service.results import encode_images
    from pi_axera_sd_service.service.runner import JobRunner

    init = read_init_image(init_image, settings.max_init_image_pixels) if init_image is not None else None
    started = time.perf_counter()
    models = _load_models(settings, files)
    load_ms = (time.perf_counter() - started) * 1000
    try:
        request = from_cli(settings, init_image=init, **request_fields)
        plan = CapabilityTable.from_models(models, settings).apply(request)
    except RequestError as exc:
        flag = CLI_FLAGS.get(exc.field, "--" + exc.field.replace("_", "-"))
        raise CliError(f"{flag}: {exc.message}") from None
    result = JobRunner.for_models(models, ProgressState()).run(plan)

    encode_start = time.perf_counter()
    blobs, _ = encode_images(result, CheckpointInfo.from_models(models), settings.png_compress_level)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(blobs[0])
    done = time.perf_counter()
    timings = {
        "load_models": load_ms,
        **result.image_timings_ms[0],
        "image_encode": (done - encode_start) * 1000,
        "total": (done - started) * 1000,
    }
    return GenerateResult(output, result.seeds[0], timings, list(result.warnings), plan.mode)


def _load_models(settings: Settings, files: tuple[Any, str] | None) -> Any:
    """LoadedModels; without configured paths the error also suggests --model-dir and --demo."""
    from pi_axera_sd_service.runtime.model_dir import load_models
    from pi_axera_sd_service.runtime.session import ModelLoadError

    model_files, backend = files or resolve_files(settings)
    try:
        return load_models(model_files, backend, device_id=settings.device_id, cache_dir=settings.cache_dir)
    except ModelLoadError as exc:
        if settings.demo or settings.model_paths_configured:
            raise
        hint = "(no model paths configured: set --model-dir / MODEL_DIR, or try --demo)"
        raise ModelLoadError(f"{exc} {hint}", exc.path) from None


# --------------------------------------------------------------------------- report

_STAGE_RANK = {"load_models": 0, "text": 1, "vae_encode": 2, "unet_step_": 3, "unet_total": 4,
               "vae_decode": 5, "image_encode": 6, "total": 8}  # unknown keys: 7, before total


def _stage_key(item: tuple[str, float]) -> tuple[int, int]:
    name = item[0]
    step = re.fullmatch(r"unet_step_(\d+)", name)
    if step:
        return _STAGE_RANK["unet_step_"], int(step.group(1))
    return _STAGE_RANK.get(name, 7), 0


def ordered_timings(timings_ms: dict[str, float]) -> list[tuple[str, float]]:
    """Stages in the order they run: load, text, VAE encode, UNet steps then their total, decode, encode."""
    return sorted(timings_ms.items(), key=_stage_key)


def print_result(result: GenerateResult) -> None:
    """Mode, seed, per-stage timings, warnings and the output path, one per line."""
    print(f"mode: {result.mode}")
    print(f"seed: {result.seed}")
    for stage, ms in ordered_timings(result.timings_ms):
        print(f"  {stage:<14} {ms:9.1f} ms")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"saved: {result.path}")


# --------------------------------------------------------------------------- upstream scripts


def add_upstream_arguments(
    parser: argparse.ArgumentParser, *, prompt: str, save_dir: str, img2img: bool = False
) -> None:
    """The flags python/run_txt2img.py and run_img2img.py share with upstream, plus --backend and --demo.

    Upstream defaults (`run_txt2img_axe_infer.py`, `run_img2img_axe_infer.py`); model files left
    unset come from `./models`.
    """
    parser.add_argument("--prompt", default=prompt)
    parser.add_argument("--text_model_dir", default="./models/", help="holds tokenizer/ and text_encoder/")
    parser.add_argument("--unet_model", help="default ./models/unet.axmodel (or .onnx)")
    if img2img:
        parser.add_argument("--vae_encoder_model", help="default ./models/vae_encoder.axmodel (or .onnx)")
    parser.add_argument("--vae_decoder_model", help="default ./models/vae_decoder.axmodel (or .onnx)")
    parser.add_argument("--time_input", help="default ./models/time_input_txt2img.npy")
    parser.add_argument("--save_dir", default=save_dir, help=f"output PNG file path (default {save_dir})")
    parser.add_argument("--backend", choices=("auto", "axengine", "onnxruntime", *UPSTREAM_BACKENDS),
                        default="auto", help="axe = axengine, onnx = onnxruntime")
    parser.add_argument("--demo", action="store_true",
                        help="use the generated CPU demo pack instead of ./models")


def upstream_settings(args: argparse.Namespace) -> Settings:
    """Settings for python/run_*.py: their upstream flags, `./models` for files not given, env for the rest.

    The package needs the 4-row `time_input_txt2img.npy`; an upstream `time_input_img2img.npy` (rows
    for 499 and 259, then zeros) is replaced by the txt2img file next to it.
    """
    time_input = Path(args.time_input) if args.time_input else None
    if time_input is not None and time_input.name == "time_input_img2img.npy":
        time_input = time_input.with_name("time_input_txt2img.npy")
        print(f"note: using {time_input} (all four time rows), not time_input_img2img.npy", file=sys.stderr)

    def path(name: str) -> Path | None:
        value = getattr(args, name, None)
        return Path(value) if value else None

    try:
        return Settings(
            model_dir=Path("./models"),
            text_model_dir=path("text_model_dir"),
            unet_model=path("unet_model"),
            vae_decoder_model=path("vae_decoder_model"),
            vae_encoder_model=path("vae_encoder_model"),
            time_input_txt2img=time_input,
            backend=UPSTREAM_BACKENDS.get(args.backend, args.backend),
            demo=bool(args.demo),
        )
    except ValidationError as exc:
        raise settings_error(exc) from None
