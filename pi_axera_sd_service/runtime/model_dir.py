"""Find the model files, load them on a backend (checked by `contract`), hash them, `check-models`.

Upstream layout (one MODEL_DIR): `tokenizer/{vocab.json,merges.txt}`,
`text_encoder/sd15_text_encoder_sim.{axmodel,onnx}`, `unet.*`, `vae_decoder.*`, `vae_encoder.*`
(optional: img2img), `time_input_txt2img.npy` (the four rows of 999, 759, 499, 259) and, optional,
`time_input_table.npy` (a row for every timestep: any LCM schedule; then the four-row file may be
absent). TEXT_MODEL_DIR gives `tokenizer/` and `text_encoder/`; explicit file settings override both.
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
    AXMODEL_INPUT_IDS_RULE,
    TIME_TABLE_SHAPE,
    TIMESTEPS,
    TOKENIZER_FILES,
    TimeInputs,
    UNetInputNames,
    check_text_encoder,
    check_time_rows_agree,
    check_tokenizer_dir,
    check_unet,
    check_vae_decoder,
    check_vae_encoder,
    load_time_inputs,
    load_time_table,
    missing_file_error,
)
from .session import ModelLoadError, Session, format_shape_dtype, format_specs

TEXT_ENCODER_FILE = "text_encoder/sd15_text_encoder_sim"
SUFFIX = {"axengine": ".axmodel", "onnxruntime": ".onnx"}
BACKENDS = ("auto", "axengine", "onnxruntime")
DEFAULT_MODEL_DIR = Path("models")
TIME_TABLE_FILE = "time_input_table.npy"

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
    time_input_table: Path | None = None  # None: not configured and not in the folder (four rows only)


@dataclass
class LoadedModels:
    """Sessions and constants for one model set, checked against the contract."""

    files: ModelFiles
    backend: str
    text_encoder: Session
    unet: Session
    vae_decoder: Session
    vae_encoder: Session | None
    time: TimeInputs  # the full table or the four rows: `time.full` says which schedules can run
    unet_inputs: UNetInputNames
    latent_shape: tuple[int, int, int, int]
    image_size: tuple[int, int]  # (width, height)
    tokenizer_dir: Path
    model_name: str
    model_sha256: str

    def time_input(self, t: int) -> np.ndarray:
        """float32 [1,1280]: the UNet's time input at timestep `t` (KeyError when the folder has none)."""
        return self.time.row(t)

    @property
    def time_inputs(self) -> np.ndarray:
        """float32 [4,1280]: the four upstream rows (999, 759, 499, 259), with or without a table."""
        return self.time.four_rows

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The four upstream timesteps, the rows of `time_inputs`."""
        return TIMESTEPS


# --- resolving paths -----------------------------------------------------------------------------


def resolve_model_files(
    model_dir: Path | None = None,
    text_model_dir: Path | None = None,
    text_encoder_model: Path | None = None,
    unet_model: Path | None = None,
    vae_decoder_model: Path | None = None,
    vae_encoder_model: Path | None = None,
    time_input_txt2img: Path | None = None,
    time_input_table: Path | None = None,
    backend: str = "auto",
) -> tuple[ModelFiles, str]:
    """Apply the upstream settings to paths and pick the backend; nothing is checked for existence here
    except what `auto` needs to decide (see `choose_backend`)."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    base, text_base = _bases(model_dir, text_model_dir)
    explicit = {"text_encoder": text_encoder_model, "unet": unet_model, "vae_decoder": vae_decoder_model,
                "vae_encoder": vae_encoder_model}
    stems = _stems(base, text_base)
    if backend == "auto":
        backend = choose_backend(explicit, stems)[0]
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
        time_input_table=Path(time_input_table) if time_input_table else _if_file(base / TIME_TABLE_FILE),
    )
    return files, backend


def _if_file(path: Path) -> Path | None:
    return path if path.is_file() else None


def _bases(model_dir: Path | None, text_model_dir: Path | None) -> tuple[Path, Path]:
    """(MODEL_DIR or ./models, TEXT_MODEL_DIR or MODEL_DIR)."""
    base = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    return base, Path(text_model_dir) if text_model_dir is not None else base


def _stems(base: Path, text_base: Path) -> dict[str, Path]:
    """The default path of each model role, without its suffix."""
    return {
        "text_encoder": text_base / TEXT_ENCODER_FILE,
        "unet": base / "unet",
        "vae_decoder": base / "vae_decoder",
        "vae_encoder": base / "vae_encoder",
    }


def choose_backend(explicit: dict[str, Path | None], stems: dict[str, Path]) -> tuple[str, str]:
    """(backend, why) for BACKEND=auto: axengine when importable and .axmodel files exist; onnxruntime
    when only .onnx files exist; with no model files yet, axengine when importable (a Pi is told it
    needs .axmodel files), else onnxruntime."""
    from .axengine_backend import axengine_import_error

    candidates = [Path(p) if p is not None else stems[role] for role, p in explicit.items()]

    def present(suffix: str) -> bool:
        return any(
            (c.suffix == suffix and c.is_file()) or c.with_suffix(suffix).is_file() for c in candidates
        )

    if present(".axmodel"):
        reason = axengine_import_error()
        if reason is None:
            return "axengine", ".axmodel files found and pyaxengine (axengine) is importable"
        if not present(".onnx"):
            raise ModelLoadError(
                f".axmodel files found ({stems['unet'].parent}) but axengine cannot be imported: {reason}. "
                "Install pyaxengine, or use BACKEND=onnxruntime with .onnx files."
            )
        return "onnxruntime", f".onnx files found; the .axmodel files need axengine: {reason}"
    if present(".onnx"):
        return "onnxruntime", ".onnx files found and no .axmodel files"
    reason = axengine_import_error()
    if reason is None:
        return "axengine", "no model files yet; pyaxengine is importable, so .axmodel files are expected"
    return "onnxruntime", f"no model files yet and axengine cannot be imported ({reason})"


def auto_backend(**model_paths: Path | None) -> tuple[str, str]:
    """(backend, why) that BACKEND=auto picks for `resolve_model_files`' path keywords (the time
    inputs do not take part; a role's file setting is `<role>_model`)."""
    stems = _stems(*_bases(model_paths.get("model_dir"), model_paths.get("text_model_dir")))
    return choose_backend({role: model_paths.get(f"{role}_model") for role in stems}, stems)


def count_devices(backend: str) -> int | None:
    """How many NPUs `backend` can use: AXCL cards seen by axengine (1 on a board); None for
    onnxruntime or when axengine cannot tell. ModelLoadError when the NPU runtime cannot start."""
    if backend != "axengine":
        return None
    from .axengine_backend import device_count

    return device_count()


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


def open_model(role: str, path: Path, backend: str, device_id: int = 0, lean_memory: bool = False,
               wrap: Wrap | None = None) -> Session:
    """open_session for one role (`text_encoder`, `clip_vision`, ...), given to `wrap(role, session)`
    when there is a wrap: a text encoder axengine cannot read is refused with the contract's words
    (pyaxengine only says "Unsupported data type")."""
    try:
        session = open_session(path, backend, device_id, lean_memory)
    except ModelLoadError as exc:
        from .axengine_backend import UnsupportedTensorTypeError

        if role == "text_encoder" and isinstance(exc, UnsupportedTensorTypeError):
            raise ModelLoadError(
                f"{path}: {AXMODEL_INPUT_IDS_RULE}; axengine cannot load this one: {exc.reason}", exc.path
            ) from None
        raise
    return wrap(role, session) if wrap is not None else session


def device_index_error(backend: str, index: int, count: int) -> ModelLoadError:
    """The runtime's wording for an index beyond the `count` (>= 1) devices `backend` sees."""
    from .axengine_backend import device_index_error, device_noun

    return device_index_error(index, count, device_noun() if backend == "axengine" else "NPU device(s)")


def check_device(backend: str, device_id: int) -> str | None:
    """Before any session: the NPU runtime starts and `device_id` exists (ModelLoadError naming the
    index and the device count otherwise). Returns e.g. `0 of 1 AXCL card(s)`; None on onnxruntime."""
    if backend != "axengine":
        return None
    from . import axengine_backend

    return axengine_backend.check_device(device_id)


def load_models(
    files: ModelFiles,
    backend: str,
    device_id: int = 0,
    wrap: Wrap | None = None,
    cache_dir: Path | None = None,
    lean_memory: bool = False,
) -> LoadedModels:
    """Load every model, check it against the contract, read the time rows (ModelLoadError on any fault).

    Call it on the thread that will run the sessions (one call per device; see axengine_backend for
    why), and once per process on axengine: pyaxengine never frees a session.
    """
    check_tokenizer_dir(files.tokenizer_dir)
    time = load_time(files)
    # Check all required files exist before spending seconds loading any of them.
    for path in (files.text_encoder, files.unet, files.vae_decoder):
        if not Path(path).is_file():
            raise missing_file_error(path)
    check_device(backend, device_id)

    def load(role: str, path: Path) -> Session:
        return open_model(role, path, backend, device_id, lean_memory, wrap)

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
        time=time,
        unet_inputs=unet_inputs,
        latent_shape=latent,
        image_size=(latent[3] * 8, latent[2] * 8),
        tokenizer_dir=files.tokenizer_dir,
        model_name=files.unet.stem,
        model_sha256=file_sha256(files.unet, cache_dir),
    )


def load_time(files: ModelFiles) -> TimeInputs:
    """The time table when there is one (checked against a four-row file next to it), else the rows."""
    if files.time_input_table is None:
        return TimeInputs.from_four_rows(load_time_inputs(files.time_input_txt2img), files.time_input_txt2img)
    time = TimeInputs.from_table(load_time_table(files.time_input_table), files.time_input_table)
    if Path(files.time_input_txt2img).is_file():
        check_time_rows_agree(time, load_time_inputs(files.time_input_txt2img), files.time_input_txt2img)
    return time


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


def check_generation_models(files: ModelFiles, backend: str, device_id: int = 0) -> list[CheckLine]:
    """Check every generation file independently (one failure does not hide the others).

    On axengine the device is checked first (a `device` line); a runtime that cannot start or a
    device index out of range raises ModelLoadError instead, as no model could load.
    """
    lines: list[CheckLine] = []
    device = check_device(backend, device_id)
    if device is not None:
        lines.append(CheckLine("device", device, backend, "-", "-", "OK"))

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
        time = load_time(files)
        covers = "any LCM schedule" if time.full else "timesteps " + ", ".join(map(str, TIMESTEPS))
        shape = format_shape_dtype(TIME_TABLE_SHAPE if time.full else time.rows.shape, time.rows.dtype)
        line("time_input", time.source, outputs=f"{shape} ({covers})")
    except ModelLoadError as exc:
        line("time_input", files.time_input_table or files.time_input_txt2img, status=str(exc))

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
            session = open_model(role, path, backend, device_id)
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
