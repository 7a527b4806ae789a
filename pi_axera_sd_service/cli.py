"""Command line: serve | generate | check-models | make-demo-models | install-service | export-clip.

Runs as the console script `pi-axera-sd` and as `python -m pi_axera_sd_service`;
`pi_axera_sd_generator.py` is the thin entry the upstream systemd unit runs as a file (no subcommand
means `serve`). Errors print one line to stderr; exit codes (exit_codes.py): 1 runtime failure,
2 argparse usage, 3 configuration (settings, model files, port), 4 serve's model load failed.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import logging
import socket
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pi_axera_sd_service.exit_codes import EXIT_CONFIG, EXIT_FAILURE, EXIT_INTERRUPTED
from pi_axera_sd_service.oneshot import (
    CliError,
    generate_image,
    print_result,
    resolve_files,
    settings_error,
)
from pi_axera_sd_service.settings import (
    MODEL_PATH_FIELDS,
    Settings,
    settings_flags,
    settings_from_cli,
)

PROG = "pi-axera-sd"
SUBCOMMANDS = ("serve", "generate", "check-models", "make-demo-models", "install-service", "export-models",
               "time-table", "calibration", "export-clip")
EXPORT_EXTRA_HINT = "install the export extra: EXTRAS=onnx,dev,export scripts/install.sh"
RUNTIME_FIELDS = (*MODEL_PATH_FIELDS, "backend", "device_id", "demo", "cache_dir", "log_level")
POLICY_FIELDS = ("strict", "guidance", "max_cfg_scale", "max_and_prompts")  # the capability table's settings
log = logging.getLogger("pi_axera_sd_service.cli")


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
        raise settings_error(exc) from None


# --------------------------------------------------------------------------- models


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


# --------------------------------------------------------------------------- subcommands


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the HTTP service (demo pack when nothing is configured and ./models is empty)."""
    from pi_axera_sd_service.api.server import configure_logging, run_server

    settings = settings_from_args(args)
    check_port_free(settings.host, settings.port)  # before a model load that takes ~15 s on the device
    configure_logging(settings)  # the server's format (LOG_JSON, LOG_LEVEL) for the fallback line too
    return int(run_server(with_demo_fallback(settings)) or 0)


def check_port_free(host: str, port: int) -> None:
    """CliError when HOST:PORT cannot be bound (in use, no permission, unknown host).

    Binds as uvicorn does (SO_REUSEADDR) and closes again; uvicorn still reports a later race.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise CliError(f"cannot listen on {host}:{port}: unknown host ({exc}); check HOST / --host") from None
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        reason = "address already in use (another instance or the upstream service?)" if (
            exc.errno == errno.EADDRINUSE) else (exc.strerror or str(exc))
        raise CliError(f"cannot listen on {host}:{port}: {reason}; stop it or set PORT / --port") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """One-shot generation to a PNG file, through the service's capability table (same warnings)."""
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
    """The backend and why, then each model file against the I/O contract: one block per item
    ([OK] or [FAIL], its inputs and outputs), then `all models OK` or `N problem(s) found`;
    exit 1 when anything is wrong. The CLIP interrogation files follow (or why interrogation is off)."""
    from pi_axera_sd_service.runtime.checks import check_models
    from pi_axera_sd_service.runtime.clip_models import resolve_clip_files
    from pi_axera_sd_service.runtime.model_dir import auto_backend, format_check_lines
    from pi_axera_sd_service.service.engine import check_device_indexes, describe_devices, device_count

    settings = settings_from_args(args)
    _setup_logging(settings.log_level)  # LOG_LEVEL=debug shows what pyaxengine printed, per model
    files, backend = resolve_files(settings, model_dir=args.folder)
    if args.folder is None and settings.demo:
        why = "DEMO: the CPU demo pack"
    elif settings.backend == "auto":
        paths = {"model_dir": args.folder} if args.folder is not None else settings.model_paths()
        why = "BACKEND=auto: " + auto_backend(**paths)[1]
    else:
        why = f"BACKEND={settings.backend}"
    print(f"backend: {backend} ({why})")
    if len(settings.devices) > 1:  # one device: check_models' own `device` line says it
        count = device_count(backend)
        print(describe_devices(settings.devices, backend, count))
        check_device_indexes(settings.devices, count, backend)   # ModelLoadError: the index and the count
    text_dir = files.tokenizer_dir.parent
    clip_files = resolve_clip_files(backend, text_model_dir=text_dir, **settings.clip_paths())
    ok = True
    for device in settings.devices:
        if len(settings.devices) > 1:
            print(f"device {device}:")
        lines = check_models(files, backend, device, clip_files)
        print(format_check_lines(lines))  # ends with "all models OK" or "N problem(s) found"
        ok = ok and all(line.ok for line in lines)
    if ok:
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


def cmd_export_models(args: argparse.Namespace) -> int:
    """Export a diffusers SD1.5 folder (or Hub id) with a fused LCM-LoRA to ONNX files in the upstream
    layout, with the time table, Pulsar2 build configs and a manifest (needs the `export` extra)."""
    try:
        from pi_axera_sd_service.export.models import ExportError, export_models
    except ImportError as exc:
        raise CliError(f"export-models needs torch and diffusers ({exc}); {EXPORT_EXTRA_HINT}") from exc
    try:
        manifest = export_models(args.source, args.out_dir, lora=args.lora, lora_scale=args.lora_scale,
                                 latent_size=args.latent_size)
    except ExportError as exc:
        raise CliError(str(exc)) from exc
    print(f"exported to {args.out_dir}: " + ", ".join(manifest["files"]))
    print(f"next: {PROG} calibration {args.out_dir} --prompts PROMPTS.txt, then pulsar2 build "
          "(models/README.md)")
    return 0


def cmd_time_table(args: argparse.Namespace) -> int:
    """Compute time_input_table.npy (every timestep 0..999) from a diffusers UNet folder or a single-file
    SD1.5 checkpoint, reading only the time-embedding weights (numpy + safetensors; no torch)."""
    try:
        from pi_axera_sd_service.export.time_table import TimeTableError, write_table
    except ImportError as exc:
        raise CliError(f"time-table needs safetensors ({exc}); {EXPORT_EXTRA_HINT}") from exc
    try:
        summary = write_table(args.source, args.out, lora=args.lora, lora_scale=args.lora_scale)
    except TimeTableError as exc:
        raise CliError(str(exc)) from exc
    fused = ", ".join(summary["lora_layers_fused"]) or "none"
    print(f"time table {summary['shape']} written to {summary['path']} (LoRA layers fused: {fused})")
    return 0


def cmd_calibration(args: argparse.Namespace) -> int:
    """Write the Pulsar2 calibration sets (text encoder, UNet, VAE decoder, VAE encoder tars) by running
    the exported ONNX models on the prompts (one per line) through this package's pipeline."""
    from pi_axera_sd_service.export.pulsar2 import write_calibration

    prompts = [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines()]
    try:
        counts = write_calibration(args.model_dir, [p for p in prompts if p], args.out, steps=args.steps)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print("calibration samples: " + ", ".join(f"{role} {n}" for role, n in counts.items()))
    return 0


def cmd_export_clip(args: argparse.Namespace) -> int:
    """Export CLIP for interrogation: ONNX graphs, projections, tag list, Pulsar2 kit (extra `export`)."""
    try:
        import torch  # noqa: F401 - checked here for a clear message
        import transformers  # noqa: F401

        from pi_axera_sd_service.export.clip import export_clip
    except ImportError as exc:
        raise CliError(f"export-clip needs torch and transformers ({exc}); {EXPORT_EXTRA_HINT}") from None
    _setup_logging("INFO")
    written = export_clip(args.out_dir, model=args.model, tags_file=args.tags,
                          tokenizer_dir=args.tokenizer_dir, images_folder=args.calibration_images)
    for path in written:
        print(path)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the docs generator)."""
    from pi_axera_sd_service.service.request import UPSTREAM_DENOISING_STRENGTH

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SD1.5-LCM on the Axera AX650N NPU behind the A1111 WebUI API. "
        "No subcommand means serve.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")

    serve = sub.add_parser("serve", help="run the HTTP service", description=cmd_serve.__doc__)
    add_settings_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="one image to a PNG file", description=cmd_generate.__doc__)
    gen.add_argument("--prompt", required=True, help="the prompt")
    gen.add_argument("--negative-prompt", default="", help="negative prompt (used when --cfg-scale > 1)")
    gen.add_argument("--seed", type=int, default=-1, help="seed; -1 picks a random one (default)")
    gen.add_argument("--steps", type=int, help="LCM steps (img2img: the schedule length): 1..MAX_STEPS "
                     "(default 8) with a time table, else 1..4; default 4; more are clamped with a warning")
    gen.add_argument("--cfg-scale", type=float, help="<= 1: one UNet pass per step (default 1); above "
                     "MAX_CFG_SCALE it is clamped with a warning, as the service")
    gen.add_argument("--init-image", type=Path, help="init image file: img2img instead of txt2img")
    gen.add_argument("--denoising-strength", type=float,
                     help=f"img2img strength (default {UPSTREAM_DENOISING_STRENGTH:g})")
    gen.add_argument("--resize-mode", type=int, default=0, choices=(0, 1, 2),
                     help="img2img: 0 stretch, 1 crop and resize, 2 resize and fill")
    gen.add_argument("--output", "-o", type=Path, default=Path("output.png"), help="PNG file to write")
    add_settings_arguments(gen, (*RUNTIME_FIELDS, *POLICY_FIELDS))
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

    exp = sub.add_parser("export-models", help="export SD1.5 + LCM-LoRA to ONNX for Pulsar2 (export extra)",
                         description=cmd_export_models.__doc__)
    exp.add_argument("out_dir", type=Path, help="folder to write (the upstream model layout)")
    exp.add_argument("--source", required=True, help="diffusers SD1.5 folder or Hub id")
    exp.add_argument("--lora", help="LCM-LoRA: folder, .safetensors file or Hub id (fused into the weights)")
    exp.add_argument("--lora-scale", type=float, default=1.0, help="LoRA fuse scale (default 1)")
    exp.add_argument("--latent-size", type=int, help="latent side (default: the UNet's sample_size, 64)")
    exp.set_defaults(func=cmd_export_models)

    table = sub.add_parser("time-table", help="compute time_input_table.npy (steps 1..MAX_STEPS)",
                           description=cmd_time_table.__doc__)
    table.add_argument("out", type=Path, help="output .npy file, or the model folder to write it into")
    table.add_argument("--source", type=Path, required=True,
                       help="diffusers folder (or its unet/), or a single-file .safetensors checkpoint")
    table.add_argument("--lora", type=Path, help="LoRA .safetensors fused first (only if it touches the "
                       "time embedding)")
    table.add_argument("--lora-scale", type=float, default=1.0, help="LoRA fuse scale (default 1)")
    table.set_defaults(func=cmd_time_table)

    calib = sub.add_parser("calibration", help="write Pulsar2 calibration sets from a prompt list",
                           description=cmd_calibration.__doc__)
    calib.add_argument("model_dir", type=Path, help="the export-models folder (.onnx files)")
    calib.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line")
    calib.add_argument("--out", type=Path, help="output folder (default MODEL_DIR/calibration)")
    calib.add_argument("--steps", type=int, default=4, help="LCM steps per prompt (default 4)")
    calib.set_defaults(func=cmd_calibration)

    export = sub.add_parser("export-clip", help="export CLIP for interrogation (needs the export extra)",
                            description=cmd_export_clip.__doc__)
    export.add_argument("out_dir", type=Path, help="folder to write")
    export.add_argument("--model", default="openai/clip-vit-base-patch32",
                        help="Hugging Face name or local folder of a CLIPModel (default: ViT-B/32)")
    export.add_argument("--tags", type=Path, help="tag list, one a line (default: timm's ImageNet-21k)")
    export.add_argument("--tokenizer-dir", type=Path,
                        help="vocab.json/merges.txt folder for the text calibration (default: the model's)")
    export.add_argument("--calibration-images", type=Path,
                        help="folder of photos for the vision calibration (default: synthetic images)")
    export.set_defaults(func=cmd_export_clip)

    inst = sub.add_parser("install-service", help="render/install the systemd unit (install-service --help)",
                          description=cmd_install_service.__doc__, add_help=False)
    inst.set_defaults(func=cmd_install_service, deploy_args=[])
    return parser


def package_version() -> str:
    """The installed package's version (from its metadata), or "unknown" when run uninstalled."""
    try:
        return importlib.metadata.version("pi_axera_sd_service")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _setup_logging(level: str) -> None:
    """Plain logging for the one-shot commands (the server configures its own)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]  # upstream unit: `python pi_axera_sd_generator.py` starts the service
    if argv[0] == "install-service":  # every following argument belongs to the deploy module
        args = argparse.Namespace(command=argv[0], func=cmd_install_service, deploy_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args.func(args))


def run_reporting_errors(func: Callable[[], int], prog: str = PROG) -> int:
    """Run `func`; errors become one line on stderr (no traceback): EXIT_CONFIG for configuration
    errors (systemd stops restarting), EXIT_FAILURE for the rest."""
    from pi_axera_sd_service.pipeline.images import ImageDecodeError
    from pi_axera_sd_service.pipeline.prompt_parser import PromptError
    from pi_axera_sd_service.pipeline.stages import StageError
    from pi_axera_sd_service.runtime.session import FeedError, ModelLoadError

    try:
        return func()
    except (CliError, ModelLoadError) as exc:
        print(f"{prog}: error: {exc} (configuration error, exit code {EXIT_CONFIG})", file=sys.stderr)
        return EXIT_CONFIG
    except (ImageDecodeError, StageError, FeedError, PromptError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except ImportError as exc:
        print(f"{prog}: error: {exc} (is the package installed? run scripts/install.sh)", file=sys.stderr)
    except OSError as exc:
        where = f" {exc.filename}:" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error:{where} {exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_FAILURE
