"""Find the model files, load them on a backend (checked by `contract`), hash them, `check-models`.

Upstream layout (one MODEL_DIR): `tokenizer/{vocab.json,merges.txt}`,
`text_encoder/sd15_text_encoder_sim.{axmodel,onnx}`, `unet.*`, `vae_decoder.*`, `vae_encoder.*`
(optional: img2img), `time_input_txt2img.npy`. TEXT_MODEL_DIR gives `tokenizer/` and `text_encoder/`;
explicit file settings override both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import (
    TIMESTEPS,
    TOKENIZER_FILES,
    UNetInputNames,
    check_text_encoder,
    check_tokenizer_dir,
    check_unet,
    check_vae_decoder,
    check_vae_encoder,
    load_time_inputs,
    missing_file_error,
)
from .session import ModelLoadError, Session, format_shape_dtype, format_specs

TEXT_ENCODER_FILE = "text_encoder/sd15_text_encoder_sim"
SUFFIX = {"axengine": ".axmodel", "onnxruntime": ".onnx"}
BACKENDS = ("auto", "axengine", "onnxruntime")
DEFAULT_MODEL_DIR = Path("models")

Wrap = Callable[[str, Session], Session]


@dataclass(frozen=True)
class ModelFiles:
    """Resolved paths of everything the pipeline loads."""

    tokenizer_dir: Path
    text_encoder: Path
    unet: Path
    vae_decoder: Path
    vae_encoder: Path | None  # None: not configured and not in the folder (img2img unavailable)
    time_input_txt2img: Path


@dataclass
class LoadedModels:
    """Sessions and constants for one model set, checked against the contract."""

    files: ModelFiles
    backend: str
    text_encoder: Session
    unet: Session
    vae_decoder: Session
    vae_encoder: Session | None
    time_inputs: np.ndarray
    timesteps: tuple[int, ...]
    unet_inputs: UNetInputNames
    latent_shape: tuple[int, int, int, int]
    image_size: tuple[int, int]  # (width, height)
    tokenizer_dir: Path
    model_name: str
    model_sha256: str


# --- resolving paths -----------------------------------------------------------------------------


def resolve_model_files(
    model_dir: Path | None = None,
    text_model_dir: Path | None = None,
    text_encoder_model: Path | None = None,
    unet_model: Path | None = None,
    vae_decoder_model: Path | None = None,
    vae_encoder_model: Path | None = None,
    time_input_txt2img: Path | None = None,
    backend: str = "auto",
) -> tuple[ModelFiles, str]:
    """Apply the upstream settings to paths and pick the backend; nothing is checked for existence here
    except what `auto` needs to decide (see `choose_backend`)."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    base = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    text_base = Path(text_model_dir) if text_model_dir is not None else base
    explicit = {
        "text_encoder": text_encoder_model,
        "unet": unet_model,
        "vae_decoder": vae_decoder_model,
        "vae_encoder": vae_encoder_model,
    }
    stems = {
        "text_encoder": text_base / TEXT_ENCODER_FILE,
        "unet": base / "unet",
        "vae_decoder": base / "vae_decoder",
        "vae_encoder": base / "vae_encoder",
    }
    if backend == "auto":
        backend = choose_backend(explicit, stems)
    suffix = SUFFIX[backend]
    paths = {
        role: Path(path) if path is not None else stems[role].with_suffix(suffix)
        for role, path in explicit.items()
    }
    for role, path in paths.items():
        if explicit[role] is not None and path.suffix in SUFFIX.values() and path.suffix != suffix:
            raise ModelLoadError(
                f"{path}: a {path.suffix} file cannot run on the {backend} backend ({role})", path
            )
    vae_encoder = paths["vae_encoder"]
    if vae_encoder_model is None and not vae_encoder.exists():
        vae_encoder = None
    files = ModelFiles(
        tokenizer_dir=text_base / "tokenizer",
        text_encoder=paths["text_encoder"],
        unet=paths["unet"],
        vae_decoder=paths["vae_decoder"],
        vae_encoder=vae_encoder,
        time_input_txt2img=Path(time_input_txt2img)
        if time_input_txt2img
        else base / "time_input_txt2img.npy",
    )
    return files, backend


def choose_backend(explicit: dict[str, Path | None], stems: dict[str, Path]) -> str:
    """axengine when importable and .axmodel files exist, else onnxruntime."""
    from .axengine_backend import axengine_import_error

    candidates = [Path(p) if p is not None else stems[role] for role, p in explicit.items()]

    def present(suffix: str) -> bool:
        return any(
            (c.suffix == suffix and c.is_file()) or c.with_suffix(suffix).is_file() for c in candidates
        )

    if present(".axmodel"):
        reason = axengine_import_error()
        if reason is None:
            return "axengine"
        if not present(".onnx"):
            raise ModelLoadError(
                f".axmodel files found ({stems['unet'].parent}) but axengine cannot be imported: {reason}. "
                "Install pyaxengine, or use BACKEND=onnxruntime with .onnx files."
            )
    return "onnxruntime"


# --- loading --------------------------------------------------------------------------------------


def open_session(path: Path, backend: str, device_id: int = 0, lean_memory: bool = False) -> Session:
    """One Session on the given backend (ModelLoadError when the file is missing or unloadable);
    `lean_memory`: onnxruntime without its memory arena."""
    path = Path(path)
    if not path.is_file():
        raise missing_file_error(path)
    if backend == "axengine":
        from .axengine_backend import AxEngineSession

        return AxEngineSession(path, device_id=device_id)
    if backend == "onnxruntime":
        from .onnx_backend import OnnxSession

        return OnnxSession(path, memory_arena=not lean_memory)
    raise ModelLoadError(f"unknown backend {backend!r}", path)


def load_models(
    files: ModelFiles,
    backend: str,
    device_id: int = 0,
    wrap: Wrap | None = None,
    cache_dir: Path | None = None,
    lean_memory: bool = False,
) -> LoadedModels:
    """Load every model, check it against the contract, read the time rows (ModelLoadError on any fault)."""
    check_tokenizer_dir(files.tokenizer_dir)
    time_inputs = load_time_inputs(files.time_input_txt2img)
    # Check all required files exist before spending seconds loading any of them.
    for path in (files.text_encoder, files.unet, files.vae_decoder):
        if not Path(path).is_file():
            raise missing_file_error(path)

    def load(role: str, path: Path) -> Session:
        session = open_session(path, backend, device_id, lean_memory)
        return wrap(role, session) if wrap is not None else session

    text_encoder = load("text_encoder", files.text_encoder)
    check_text_encoder(text_encoder)
    unet = load("unet", files.unet)
    unet_inputs, latent = check_unet(unet)
    vae_decoder = load("vae_decoder", files.vae_decoder)
    check_vae_decoder(vae_decoder, latent)
    vae_encoder = None
    if files.vae_encoder is not None:
        vae_encoder = load("vae_encoder", files.vae_encoder)
        check_vae_encoder(vae_encoder, latent)
    return LoadedModels(
        files=files,
        backend=backend,
        text_encoder=text_encoder,
        unet=unet,
        vae_decoder=vae_decoder,
        vae_encoder=vae_encoder,
        time_inputs=time_inputs,
        timesteps=TIMESTEPS,
        unet_inputs=unet_inputs,
        latent_shape=latent,
        image_size=(latent[3] * 8, latent[2] * 8),
        tokenizer_dir=files.tokenizer_dir,
        model_name=files.unet.stem,
        model_sha256=file_sha256(files.unet, cache_dir),
    )


# --- hashing -------------------------------------------------------------------------------------


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file; with a cache_dir, remembered in hashes.json by (path, size, mtime).

    The cache is best effort: a corrupt, foreign or unwritable hashes.json only costs a re-hash.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_file = Path(cache_dir) / "hashes.json" if cache_dir is not None else None
    cache = _read_hash_cache(cache_file) if cache_file is not None else {}
    entry = cache.get(key)
    if (
        isinstance(entry, dict)
        and all(entry.get(k) == v for k, v in stamp.items())
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    sha = digest.hexdigest()
    if cache_file is not None:
        cache[key] = {**stamp, "sha256": sha}
        _write_hash_cache(cache_file, cache)
    return sha


def _read_hash_cache(cache_file: Path) -> dict:
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_hash_cache(cache_file: Path, cache: dict) -> None:
    """Atomic replace; any OSError (read-only folder, a file in the way) leaves nothing behind."""
    temp: str | None = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".hashes_", dir=cache_file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(cache, handle, indent=1)
        os.replace(temp, cache_file)
        temp = None
    except OSError:
        pass
    finally:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)


# --- check-models --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckLine:
    """One line of `check-models`: a file, what it offers, and OK or what is wrong."""

    role: str
    file: str
    backend: str
    inputs: str
    outputs: str
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "OK" or self.status.startswith("not configured")


def check_models(files: ModelFiles, backend: str, device_id: int = 0) -> list[CheckLine]:
    """Check every file independently (one failure does not hide the others)."""
    lines: list[CheckLine] = []

    def line(role: str, path: Path | None, inputs: str = "-", outputs: str = "-", status: str = "OK") -> None:
        lines.append(
            CheckLine(role, str(path) if path is not None else "-", backend, inputs, outputs, status)
        )

    try:
        check_tokenizer_dir(files.tokenizer_dir)
        line("tokenizer", files.tokenizer_dir, inputs=", ".join(TOKENIZER_FILES))
    except ModelLoadError as exc:
        line("tokenizer", files.tokenizer_dir, status=str(exc))
    try:
        rows = load_time_inputs(files.time_input_txt2img)
        line("time_input", files.time_input_txt2img, outputs=format_shape_dtype(rows.shape, rows.dtype))
    except ModelLoadError as exc:
        line("time_input", files.time_input_txt2img, status=str(exc))

    latent: tuple[int, ...] = (1, 4, 64, 64)  # the contract's size when the UNet cannot tell us
    roles: list[tuple[str, Path | None]] = [
        ("text_encoder", files.text_encoder),
        ("unet", files.unet),
        ("vae_decoder", files.vae_decoder),
        ("vae_encoder", files.vae_encoder),
    ]
    for role, path in roles:
        if path is None:
            line(role, None, status="not configured (img2img unavailable)")
            continue
        session = None
        try:
            session = open_session(path, backend, device_id)
            if role == "text_encoder":
                check_text_encoder(session)
            elif role == "unet":
                latent = check_unet(session)[1]
            elif role == "vae_decoder":
                check_vae_decoder(session, latent)
            else:
                check_vae_encoder(session, latent)
            status = "OK"
        except ModelLoadError as exc:
            status = str(exc)
        inputs = format_specs(session.inputs) if session is not None else "-"
        outputs = format_specs(session.outputs) if session is not None else "-"
        line(role, path, inputs, outputs, status)
    return lines


def format_check_lines(lines: list[CheckLine]) -> str:
    """Human-readable report, one block per model, ending with a verdict line."""
    text = []
    for item in lines:
        text.append(f"[{'OK' if item.ok else 'FAIL'}] {item.role}: {item.file} ({item.backend})")
        if item.inputs != "-":
            text.append(f"      inputs:  {item.inputs}")
        if item.outputs != "-":
            text.append(f"      outputs: {item.outputs}")
        if item.status != "OK":
            text.append(f"      {item.status}")
    bad = sum(not item.ok for item in lines)
    text.append("all models OK" if bad == 0 else f"{bad} problem(s) found")
    return "\n".join(text)
