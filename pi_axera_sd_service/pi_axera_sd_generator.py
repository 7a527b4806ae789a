"""Command line: serve | generate | check-models | make-demo-models | install-service.

Runs as the console script `pi-axera-sd`, as `python -m pi_axera_sd_service` and, like the upstream
systemd unit, as `python pi_axera_sd_service/pi_axera_sd_generator.py` (no subcommand means `serve`).
User errors print one line to stderr and exit 1; argparse usage errors exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import the package from the checkout, not its folder's modules
    _PKG_DIR = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _PKG_DIR]
    sys.path.insert(0, str(_PKG_DIR.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import secrets  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import typing  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from pi_axera_sd_service.settings import (  # noqa: E402
    MODEL_PATH_FIELDS,
    Settings,
    settings_flags,
    settings_from_cli,
)

PROG = "pi-axera-sd"
SUBCOMMANDS = ("serve", "generate", "check-models", "make-demo-models", "install-service")
RUNTIME_FIELDS = (*MODEL_PATH_FIELDS, "backend", "device_id", "demo", "cache_dir", "log_level")
log = logging.getLogger("pi_axera_sd_service.cli")


class CliError(Exception):
    """A user error: printed as one line, exit status 1."""


# --------------------------------------------------------------------------- settings flags


def _argparse_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for one Settings field type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _argparse_kwargs(members[0]) if len(members) == 1 else {"type": str}
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return {"choices": list(choices), "type": type(choices[0])}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str, Path):
        return {"type": annotation}
    return {"type": str}


def add_settings_arguments(parser: argparse.ArgumentParser, fields: Iterable[str] | None = None) -> None:
    """Add `--field-name` for each Settings field (all by default); unset flags stay None (env wins)."""
    wanted = set(fields) if fields is not None else None
    for item in settings_flags():
        if wanted is not None and item.field not in wanted:
            continue
        kwargs = _argparse_kwargs(Settings.model_fields[item.field].annotation)
        help_text = f"{item.description} [env {item.env}; default {item.default}]".replace("%", "%%")
        if kwargs.get("action") is None and "choices" not in kwargs:
            kwargs["metavar"] = item.env
        parser.add_argument(item.flag, dest=item.field, default=None, help=help_text, **kwargs)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment with the flags that were given on top."""
    given = {f.field: getattr(args, f.field) for f in settings_flags() if hasattr(args, f.field)}
    try:
        return settings_from_cli(given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise CliError(f"invalid settings: {problems}") from None


# --------------------------------------------------------------------------- models


def resolve_files(settings: Settings, model_dir: Path | None = None) -> tuple[Any, str]:
    """(ModelFiles, backend) for the configured models, an explicit folder, or the demo pack."""
    from pi_axera_sd_service.runtime.model_dir import resolve_model_files
    from pi_axera_sd_service.service.engine import configured_model_files

    if model_dir is not None:
        return resolve_model_files(model_dir=model_dir, backend=settings.backend)
    return configured_model_files(settings)


def with_demo_fallback(settings: Settings) -> Settings:
    """Serve the demo pack when no model path is configured and ./models holds no model files.

    A folder holding some but not all files, or models the backend cannot open, is not replaced:
    loading then fails naming what is wrong.
    """
    from pi_axera_sd_service.runtime.session import ModelLoadError

    if settings.demo or settings.model_paths_configured:
        return settings
    try:
        files, _ = resolve_files(settings)
    except ModelLoadError:
        return settings  # e.g. .axmodel files without axengine: let the load report it
    if any(Path(p).is_file() for p in (files.text_encoder, files.unet, files.vae_decoder)):
        return settings
    reason = f"no model files in {Path(files.unet).parent.resolve()}"
    log.warning(
        "%s and no model paths configured: serving the demo pack on the CPU "
        "(set MODEL_DIR or --model-dir to serve real models)",
        reason,
    )
    return settings.model_copy(update={"demo": True})


UPSTREAM_BACKENDS = {"axe": "axengine", "onnx": "onnxruntime"}


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
        raise CliError(f"invalid settings: {exc.errors()[0]['msg']}") from None


@dataclass
class GenerateResult:
    """What a one-shot generation reports."""

    path: Path
    seed: int
    timings_ms: dict[str, float]
    warnings: list[str]
    mode: str


def generate_image(
    settings: Settings,
    *,
    prompt: str,
    output: Path,
    negative_prompt: str = "",
    seed: int = -1,
    steps: int = 4,
    cfg_scale: float = 1.0,
    init_image: Path | None = None,
    denoising_strength: float = 0.5,
    resize_mode: int = 0,
    files: tuple[Any, str] | None = None,
) -> GenerateResult:
    """One txt2img (or img2img with `init_image`) through Pipeline.generate, written as a PNG.

    The PNG carries the A1111 infotext (`parameters` chunk), as the service's images do.
    """
    from pi_axera_sd_service.pipeline.generate import ImageJob, Pipeline
    from pi_axera_sd_service.pipeline.images import decode_image_bytes, encode_image, resize_image
    from pi_axera_sd_service.pipeline.scheduler import img2img_timesteps, txt2img_timesteps
    from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer
    from pi_axera_sd_service.runtime.model_dir import load_models
    from pi_axera_sd_service.runtime.session import ModelLoadError
    from pi_axera_sd_service.service.infotext import create_infotext

    if not 1 <= steps <= 4:
        raise CliError(f"--steps must be 1..4 (time rows exist for 999, 759, 499, 259), got {steps}")
    if init_image is not None and not 0.0 <= denoising_strength <= 1.0:
        raise CliError(f"--denoising-strength must be in [0, 1], got {denoising_strength}")
    seed = secrets.randbelow(2**32) if seed is None or seed < 0 else seed
    init = None
    if init_image is not None:
        try:
            raw = Path(init_image).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read init image {init_image}: {exc.strerror or exc}") from None
        init = decode_image_bytes(raw, settings.max_init_image_pixels)

    model_files, backend = files or resolve_files(settings)
    t0 = time.perf_counter()
    try:
        models = load_models(model_files, backend, device_id=settings.device_id, cache_dir=settings.cache_dir)
    except ModelLoadError as exc:
        if settings.demo or settings.model_paths_configured:
            raise
        raise ModelLoadError(f"{exc} (no model paths configured: set --model-dir / MODEL_DIR, or try --demo)",
                             exc.path) from None
    load_ms = (time.perf_counter() - t0) * 1000
    if init is not None:
        if models.vae_encoder is None:
            raise CliError("img2img needs a VAE encoder model (--vae-encoder-model / VAE_ENCODER_MODEL)")
        width, height = models.image_size
        init = resize_image(init, resize_mode, width, height)
        timesteps = img2img_timesteps(denoising_strength, steps)
    else:
        timesteps = txt2img_timesteps(steps)

    job = ImageJob(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        subseed=0,
        subseed_strength=0.0,
        timesteps=list(timesteps),
        cfg_scale=cfg_scale,
        init_image=init,
        max_and_prompts=settings.max_and_prompts,
    )
    pipeline = Pipeline(models, ClipTokenizer.from_dir(models.tokenizer_dir))
    result = pipeline.generate(job)
    t1 = time.perf_counter()
    infotext = create_infotext(
        prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler="LCM",
        scheduler_label="Automatic", cfg_scale=cfg_scale, seed=seed,
        width=result.image.width, height=result.image.height,
        model_hash=models.model_sha256[:10], model_name=models.model_name,
        denoising_strength=denoising_strength if init is not None else None,
    )
    data = encode_image(result.image, "png", infotext, png_compress_level=settings.png_compress_level)
    timings = {"load_models": load_ms, **result.timings_ms, "image_encode": (time.perf_counter() - t1) * 1000}
    output = Path(output)
    if output.parent and not output.parent.exists():
        output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    mode = "img2img" if init is not None else "txt2img"
    return GenerateResult(output, seed, timings, list(result.warnings), mode)


def print_result(result: GenerateResult) -> None:
    """Seed, per-stage timings and the output path, one per line."""
    print(f"mode: {result.mode}")
    print(f"seed: {result.seed}")
    totals = {k: v for k, v in result.timings_ms.items() if k.endswith("_total")}
    for stage, ms in [*((k, v) for k, v in result.timings_ms.items() if k not in totals), *totals.items()]:
        print(f"  {stage:<14} {ms:9.1f} ms")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"saved: {result.path}")


# --------------------------------------------------------------------------- subcommands


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the HTTP service (demo pack when nothing is configured and ./models is empty)."""
    from pi_axera_sd_service.api.server import configure_logging, run_server

    settings = settings_from_args(args)
    configure_logging(settings)  # the server's format (LOG_JSON, LOG_LEVEL) for the fallback line too
    return int(run_server(with_demo_fallback(settings)) or 0)


def cmd_generate(args: argparse.Namespace) -> int:
    """One-shot generation to a PNG file."""
    settings = settings_from_args(args)
    _setup_logging(settings.log_level)
    result = generate_image(
        settings,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        init_image=args.init_image,
        denoising_strength=args.denoising_strength,
        resize_mode=args.resize_mode,
        output=args.output,
    )
    print_result(result)
    return 0


def cmd_check_models(args: argparse.Namespace) -> int:
    """One line per model; exit 1 when anything is wrong."""
    from pi_axera_sd_service.runtime.model_dir import check_models, format_check_lines

    settings = settings_from_args(args)
    files, backend = resolve_files(settings, model_dir=args.folder)
    lines = check_models(files, backend, settings.device_id)
    print(format_check_lines(lines))  # ends with "all models OK" or "N problem(s) found"
    if all(line.ok for line in lines):
        return 0
    print(f"{PROG}: check-models: see the [FAIL] lines above", file=sys.stderr)
    return 1


def cmd_make_demo_models(args: argparse.Namespace) -> int:
    """Write the demo model pack into FOLDER."""
    from pi_axera_sd_service.runtime.demo_pack import make_demo_pack

    folder = make_demo_pack(Path(args.folder))
    print(f"demo pack written to {folder}")
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    """Render (and optionally install) the systemd unit: arguments go to pi_axera_sd_service.deploy."""
    from pi_axera_sd_service import deploy

    return int(deploy.main(list(args.deploy_args)) or 0)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs generator)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SD1.5-LCM on the Axera AX650N NPU behind the A1111 WebUI API. "
        "No subcommand means serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")

    serve = sub.add_parser("serve", help="run the HTTP service", description=cmd_serve.__doc__)
    add_settings_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="one image to a PNG file", description=cmd_generate.__doc__)
    gen.add_argument("--prompt", required=True, help="the prompt")
    gen.add_argument("--negative-prompt", default="", help="negative prompt (used when --cfg-scale > 1)")
    gen.add_argument("--seed", type=int, default=-1, help="seed; -1 picks a random one (default)")
    gen.add_argument("--steps", type=int, default=4, help="1..4 LCM steps (img2img: the schedule length)")
    gen.add_argument("--cfg-scale", type=float, default=1.0, help="<= 1: one UNet pass per step (default 1)")
    gen.add_argument("--init-image", type=Path, help="init image file: img2img instead of txt2img")
    gen.add_argument("--denoising-strength", type=float, default=0.5, help="img2img strength (default 0.5)")
    gen.add_argument("--resize-mode", type=int, default=0, choices=(0, 1, 2),
                     help="img2img: 0 stretch, 1 crop and resize, 2 resize and fill")
    gen.add_argument("--output", "-o", type=Path, default=Path("output.png"), help="PNG file to write")
    add_settings_arguments(gen, RUNTIME_FIELDS)
    gen.set_defaults(func=cmd_generate)

    check = sub.add_parser("check-models", help="verify model files against the I/O contract",
                           description=cmd_check_models.__doc__)
    check.add_argument("folder", nargs="?", type=Path, help="model folder (default: the configured models)")
    add_settings_arguments(check, RUNTIME_FIELDS)
    check.set_defaults(func=cmd_check_models)

    demo = sub.add_parser("make-demo-models", help="write the small CPU demo model pack",
                          description=cmd_make_demo_models.__doc__)
    demo.add_argument("folder", type=Path, help="folder to write")
    demo.set_defaults(func=cmd_make_demo_models)

    inst = sub.add_parser("install-service", help="render/install the systemd unit (install-service --help)",
                          description=cmd_install_service.__doc__, add_help=False)
    inst.set_defaults(func=cmd_install_service, deploy_args=[])
    return parser


def _setup_logging(level: str) -> None:
    """Plain logging for the one-shot commands (the server configures its own)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]  # upstream unit: `python pi_axera_sd_generator.py` starts the service
    if argv[0] == "install-service":  # every following argument belongs to the deploy module
        args = argparse.Namespace(command=argv[0], func=cmd_install_service, deploy_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args.func(args))


def run_reporting_errors(func: Callable[[], int], prog: str = PROG) -> int:
    """Run `func`; user errors become one line on stderr and exit status 1 (no traceback)."""
    from pi_axera_sd_service.pipeline.images import ImageDecodeError
    from pi_axera_sd_service.pipeline.stages import StageError
    from pi_axera_sd_service.runtime.session import FeedError, ModelLoadError

    try:
        return func()
    except (CliError, ModelLoadError, ImageDecodeError, StageError, FeedError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except ImportError as exc:
        print(f"{prog}: error: {exc} (is the package installed? run scripts/install.sh)", file=sys.stderr)
    except OSError as exc:
        where = f" {exc.filename}:" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error:{where} {exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
