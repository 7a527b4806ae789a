"""CLIP interrogation models: find, load and check them; say why interrogation is off.

Upstream layout (TEXT_MODEL_DIR, which defaults to MODEL_DIR): `clip_base_vision.{axmodel,onnx}`,
`clip_base_text.{axmodel,onnx}`, plus the two projections `clip_visual_projection.npy` [768,512] and
`clip_text_projection.npy` [512,512] (each `projection.weight.T`, used as `pooled @ P`) and the tag list
`interrogate_tags.txt`. Contract: vision `pixel_values` float32 [1,3,224,224] -> a pooled float32 [1,768]
output; text `input_ids` int32 (or int64) [1,77] -> a pooled float32 [1,512] output. The pooled output is
the one of rank 2 (the other output is the last hidden state).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import check_tokenizer_dir, missing_file_error, read_npy
from .model_dir import DEFAULT_MODEL_DIR, SUFFIX, CheckLine, Wrap, file_sha256, open_model, open_session
from .session import ModelLoadError, Session, TensorSpec, format_shape_dtype, format_specs

VISION_FILE = "clip_base_vision"
TEXT_FILE = "clip_base_text"
VISUAL_PROJECTION_FILE = "clip_visual_projection.npy"
TEXT_PROJECTION_FILE = "clip_text_projection.npy"
TAGS_FILE = "interrogate_tags.txt"
IMAGE_SIZE = 224
VISION_WIDTH, TEXT_WIDTH, EMBED_DIM = 768, 512, 512
CONTEXT_LEN = 77
PIXEL_SHAPE = (1, 3, IMAGE_SIZE, IMAGE_SIZE)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP image processor's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

@dataclass(frozen=True)
class ClipFiles:
    """Resolved paths of everything interrogation loads."""

    vision: Path
    text: Path
    visual_projection: Path
    text_projection: Path
    tags: Path
    tokenizer_dir: Path


@dataclass(frozen=True)
class InterrogationOff:
    """Interrogation is unavailable; `reason` says why (the routes answer 501 with it)."""

    reason: str

    def __str__(self) -> str:
        return f"interrogation off: {self.reason}"


@dataclass
class ClipModels:
    """Loaded, contract-checked CLIP sessions and projections."""

    files: ClipFiles
    backend: str
    vision: Session
    text: Session
    vision_pooled: int  # index of the pooled [1,768] output
    text_pooled: int  # index of the pooled [1,512] output
    visual_projection: np.ndarray  # float32 [768,512]
    text_projection: np.ndarray  # float32 [512,512]
    tags: list[str]  # the tag list /interrogate scores against
    text_fingerprint: str  # sha256 over text model, text projection and tokenizer: keys the tag cache


def resolve_clip_files(
    backend: str,
    model_dir: Path | None = None,
    text_model_dir: Path | None = None,
    clip_vision_model: Path | None = None,
    clip_text_model: Path | None = None,
    clip_visual_projection: Path | None = None,
    clip_text_projection: Path | None = None,
    interrogate_tags_file: Path | None = None,
) -> ClipFiles:
    """Apply the settings to paths (`backend` is the resolved one: axengine or onnxruntime)."""
    if backend not in SUFFIX:
        raise ModelLoadError(f"unknown backend {backend!r} for the CLIP models")
    base = Path(text_model_dir or model_dir or DEFAULT_MODEL_DIR)
    suffix = SUFFIX[backend]

    def model(explicit: Path | None, stem: str) -> Path:
        path = Path(explicit) if explicit is not None else base / f"{stem}{suffix}"
        if path.suffix in SUFFIX.values() and path.suffix != suffix:
            raise ModelLoadError(f"{path}: a {path.suffix} file cannot run on the {backend} backend", path)
        return path

    return ClipFiles(
        vision=model(clip_vision_model, VISION_FILE),
        text=model(clip_text_model, TEXT_FILE),
        visual_projection=Path(clip_visual_projection or base / VISUAL_PROJECTION_FILE),
        text_projection=Path(clip_text_projection or base / TEXT_PROJECTION_FILE),
        tags=Path(interrogate_tags_file or base / TAGS_FILE),
        tokenizer_dir=base / "tokenizer",
    )


# --- contract ------------------------------------------------------------------------------------


def _pooled_output(session: Session, width: int, role: str) -> int:
    """Index of the float32 [1,width] output."""
    for index, spec in enumerate(session.outputs):
        if spec.dtype == np.float32 and len(spec.shape) == 2 and spec.accepts_shape((1, width)):
            return index
    raise ModelLoadError(
        f"{session.path}: {role} outputs: expected a pooled float32[1,{width}], "
        f"found {format_specs(session.outputs)}",
        session.path,
    )


def _one_input(session: Session, role: str, dtypes: tuple[type, ...], shape: tuple[int, ...]) -> TensorSpec:
    want = " or ".join(format_shape_dtype(shape, d) for d in dtypes)
    inputs = session.inputs
    if len(inputs) != 1 or inputs[0].dtype not in dtypes or not inputs[0].accepts_shape(shape):
        raise ModelLoadError(
            f"{session.path}: {role} input: expected one input {want}, found {format_specs(inputs)}",
            session.path,
        )
    return inputs[0]


def check_clip_vision(session: Session) -> int:
    """float32 [1,3,224,224] -> pooled float32 [1,768]; returns the pooled output's index."""
    _one_input(session, "CLIP vision", (np.float32,), PIXEL_SHAPE)
    return _pooled_output(session, VISION_WIDTH, "CLIP vision")


def check_clip_text(session: Session) -> int:
    """int32/int64 [1,77] -> pooled float32 [1,512]; returns the pooled output's index."""
    _one_input(session, "CLIP text", (np.int32, np.int64), (1, CONTEXT_LEN))
    return _pooled_output(session, TEXT_WIDTH, "CLIP text")


def load_projection(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A float [in,out] matrix from a .npy file, as float32 (ModelLoadError naming the file otherwise)."""
    path = Path(path)
    matrix = read_npy(path, "projection file")
    if matrix.shape != shape or not np.issubdtype(matrix.dtype, np.floating):
        raise ModelLoadError(
            f"{path}: projection: expected {format_shape_dtype(shape, np.float32)}, "
            f"found {format_shape_dtype(matrix.shape, matrix.dtype)}",
            path,
        )
    return np.ascontiguousarray(matrix, dtype=np.float32)


def read_tags(path: Path) -> list[str]:
    """One tag a line, stripped; blanks and repeats skipped (ModelLoadError when unreadable or empty)."""
    path = Path(path)
    if not path.is_file():
        raise missing_file_error(path, "tag list")
    try:
        tags = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable tag list: {exc}", path) from exc
    tags = list(dict.fromkeys(tag for tag in tags if tag))
    if not tags:
        raise ModelLoadError(f"{path}: the tag list is empty", path)
    return tags


# --- loading -------------------------------------------------------------------------------------


def absent_reason(files: ClipFiles) -> str | None:
    """Why interrogation is off before anything is opened (a model file missing), else None."""
    missing = [p for p in (files.vision, files.text) if not Path(p).is_file()]
    if not missing:
        return None
    names = " and ".join(str(p) for p in missing)
    return f"no CLIP model at {names} (set CLIP_VISION_MODEL / CLIP_TEXT_MODEL or export them: export-clip)"


def load_clip_models(
    files: ClipFiles,
    backend: str,
    device_id: int = 0,
    wrap: Wrap | None = None,
    cache_dir: Path | None = None,
) -> ClipModels:
    """Load and check both models and projections (ModelLoadError naming the file on any fault)."""
    reason = absent_reason(files)
    if reason is not None:
        raise ModelLoadError(reason)
    check_tokenizer_dir(files.tokenizer_dir)
    visual_projection = load_projection(files.visual_projection, (VISION_WIDTH, EMBED_DIM))
    text_projection = load_projection(files.text_projection, (TEXT_WIDTH, EMBED_DIM))
    tags = read_tags(files.tags)

    def load(role: str, path: Path) -> Session:
        return open_model(role, path, backend, device_id, wrap=wrap)

    vision = load("clip_vision", files.vision)
    vision_pooled = check_clip_vision(vision)
    text = load("clip_text", files.text)
    text_pooled = check_clip_text(text)
    digest = hashlib.sha256()
    for path in (files.text, files.text_projection, files.tokenizer_dir / "vocab.json",
                 files.tokenizer_dir / "merges.txt"):
        digest.update(file_sha256(path, cache_dir).encode())
    return ClipModels(files, backend, vision, text, vision_pooled, text_pooled,
                      visual_projection, text_projection, tags, digest.hexdigest())


def try_load_clip_models(
    files: ClipFiles,
    backend: str,
    device_id: int = 0,
    wrap: Wrap | None = None,
    cache_dir: Path | None = None,
) -> ClipModels | InterrogationOff:
    """`load_clip_models`, with any fault turned into InterrogationOff (generation keeps running)."""
    try:
        return load_clip_models(files, backend, device_id, wrap, cache_dir)
    except ModelLoadError as exc:
        return InterrogationOff(str(exc))


# --- check-models --------------------------------------------------------------------------------


def clip_check_lines(files: ClipFiles, backend: str, device_id: int = 0) -> list[CheckLine]:
    """check-models lines for the CLIP files, ending with an `interrogation` verdict line.

    Absent models are not a fault (`not configured`, interrogation off); present but broken ones are.
    """
    lines: list[CheckLine] = []
    reason = absent_reason(files)
    off = f"not configured (interrogation off: {reason})" if reason else ""

    def line(role: str, path: Path, inputs: str = "-", outputs: str = "-", status: str = "OK") -> None:
        lines.append(CheckLine(role, str(path), backend, inputs, outputs, status))

    for role, path, check in (("clip_vision", files.vision, check_clip_vision),
                              ("clip_text", files.text, check_clip_text)):
        if not Path(path).is_file():
            line(role, path, status=off)
            continue
        session = None
        try:
            session = open_session(path, backend, device_id)
            check(session)
            status = "OK"
        except ModelLoadError as exc:
            status = str(exc)
        line(role, path, format_specs(session.inputs) if session else "-",
             format_specs(session.outputs) if session else "-", status)
    for role, path, shape in (("clip_visual_projection", files.visual_projection, (VISION_WIDTH, EMBED_DIM)),
                              ("clip_text_projection", files.text_projection, (TEXT_WIDTH, EMBED_DIM))):
        if reason and not Path(path).is_file():
            line(role, path, status=off)
            continue
        try:
            matrix = load_projection(path, shape)
            line(role, path, outputs=format_shape_dtype(matrix.shape, matrix.dtype))
        except ModelLoadError as exc:
            line(role, path, status=str(exc))
    try:
        tags = read_tags(files.tags)
        line("interrogate_tags", files.tags, outputs=f"{len(tags)} tags")
    except ModelLoadError as exc:
        line("interrogate_tags", files.tags, status=off or str(exc))
    clip_ok = all(item.status == "OK" for item in lines)
    if reason:
        verdict = off
    elif clip_ok:
        verdict = "OK"
    else:
        verdict = "interrogation off: see the CLIP lines above"
    line("interrogation", files.vision.parent, outputs="on" if verdict == "OK" else "off", status=verdict)
    return lines
