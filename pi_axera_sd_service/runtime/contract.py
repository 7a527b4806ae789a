"""The SD1.5-LCM model I/O contract (models/README.md): checks of loaded sessions and the time rows.

Every failure is a ModelLoadError whose message names the file, the input or output, what was
expected and what was found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .session import DYNAMIC, ModelLoadError, Session, TensorSpec, format_shape_dtype, format_specs

TIMESTEPS = (999, 759, 499, 259)   # the LCM timesteps of the time-embedding rows, in order
CONTEXT_SHAPE = (1, 77, 768)
TIME_DIM = 1280
NUM_TRAIN_TIMESTEPS = 1000
TIME_TABLE_SHAPE = (NUM_TRAIN_TIMESTEPS, TIME_DIM)  # time_input_table.npy: a row for every t = 0..999
ORIGINAL_INFERENCE_STEPS = 50  # LCM-LoRA's distillation skeleton: t = 20k - 1, k = 1..50
# Every LCM schedule runs timesteps of the skeleton: the rows of a table the service keeps.
LCM_SKELETON = tuple(range(NUM_TRAIN_TIMESTEPS // ORIGINAL_INFERENCE_STEPS - 1, NUM_TRAIN_TIMESTEPS,
                           NUM_TRAIN_TIMESTEPS // ORIGINAL_INFERENCE_STEPS))
TIME_ROWS_TOLERANCE = 1e-3  # a table and a four-row file from the same UNet agree far closer than this
TOKENIZER_FILES = ("vocab.json", "merges.txt")
AXMODEL_INPUT_IDS_RULE = "the .axmodel text encoder must take int32 input_ids (the published models do)"


@dataclass(frozen=True)
class UNetInputNames:
    """The UNet's three input names, told apart by shape."""

    sample: str  # [1,4,h,w]
    time: str  # [1,1280]
    context: str  # [1,77,768]


def missing_file_error(path: Path, what: str = "model file") -> ModelLoadError:
    """`model file not found: X` (saying so when its whole folder is missing)."""
    path = Path(path)
    if not path.parent.is_dir():
        return ModelLoadError(f"{what} not found: {path} (folder {path.parent} does not exist)", path)
    return ModelLoadError(f"{what} not found: {path}", path)


def _mismatch(session: Session, what: str, spec: TensorSpec | None, expected: str) -> ModelLoadError:
    found = spec.describe() if spec is not None else "nothing"
    return ModelLoadError(f"{session.path}: {what}: expected {expected}, found {found}", session.path)


def _fits(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    return spec.accepts_shape(shape)


def _first_output(session: Session, shape: tuple[int, ...], role: str) -> None:
    output = session.outputs[0] if session.outputs else None
    if output is None or output.dtype != np.float32 or not _fits(output, shape):
        raise _mismatch(session, f"{role} output 0", output, format_shape_dtype(shape, np.float32))


def check_text_encoder(session: Session) -> None:
    """One int32/int64 [1,77] input -> float32 [1,77,768] as the first output (int32 on axengine:
    pyaxengine cannot feed int64)."""
    if len(session.inputs) != 1:
        raise ModelLoadError(
            f"{session.path}: text encoder inputs: expected one int32/int64[1,77] input, "
            f"found {format_specs(session.inputs)}",
            session.path,
        )
    ids = session.inputs[0]
    if ids.dtype not in (np.int32, np.int64) or not _fits(ids, (1, 77)):
        raise _mismatch(session, f"text encoder input {ids.name!r}", ids, "int32[1,77] or int64[1,77]")
    if session.backend == "axengine" and ids.dtype != np.int32:
        raise ModelLoadError(
            f"{session.path}: {AXMODEL_INPUT_IDS_RULE}; found {ids.describe()}", session.path
        )
    _first_output(session, CONTEXT_SHAPE, "text encoder")


def check_unet(session: Session) -> tuple[UNetInputNames, tuple[int, int, int, int]]:
    """Three float32 inputs told apart by shape: sample [1,4,h,w], time [1,1280], context [1,77,768]."""
    expected = f"float32[1,4,h,w], float32[1,{TIME_DIM}], float32[1,77,768]"
    if len(session.inputs) != 3:
        raise ModelLoadError(
            f"{session.path}: UNet inputs: expected 3 ({expected}), found {format_specs(session.inputs)}",
            session.path,
        )
    found: dict[str, TensorSpec] = {}
    for spec in session.inputs:
        if spec.dtype != np.float32:
            raise _mismatch(session, f"UNet input {spec.name!r}", spec, "float32")
        if len(spec.shape) == 4 and spec.shape[:2] == (1, 4) and DYNAMIC not in spec.shape:
            found.setdefault("sample", spec)
        elif spec.shape == (1, TIME_DIM):
            found.setdefault("time", spec)
        elif spec.shape == CONTEXT_SHAPE:
            found.setdefault("context", spec)
    for role, want in (
        ("sample", "float32[1,4,h,w]"),
        ("time", f"float32[1,{TIME_DIM}]"),
        ("context", "float32[1,77,768]"),
    ):
        if role not in found:
            raise ModelLoadError(
                f"{session.path}: UNet {role} input: expected {want}, found {format_specs(session.inputs)}",
                session.path,
            )
    latent = tuple(found["sample"].shape)
    _first_output(session, latent, "UNet")
    names = UNetInputNames(found["sample"].name, found["time"].name, found["context"].name)
    return names, latent  # type: ignore[return-value]


def check_vae_decoder(session: Session, latent: tuple[int, ...]) -> None:
    """[1,4,h,w] -> [1,3,8h,8w]."""
    _, _, h, w = latent
    _check_one_float_input(session, "VAE decoder", tuple(latent), (1, 3, 8 * h, 8 * w))


def check_vae_encoder(session: Session, latent: tuple[int, ...]) -> None:
    """[1,3,8h,8w] -> [1,8,h,w] (mean and logvar)."""
    _, _, h, w = latent
    _check_one_float_input(session, "VAE encoder", (1, 3, 8 * h, 8 * w), (1, 8, h, w))


def _check_one_float_input(
    session: Session, label: str, input_shape: tuple[int, ...], output_shape: tuple[int, ...]
) -> None:
    """Exactly one float32 input of `input_shape` (any name) and a first output of `output_shape`."""
    inputs = session.inputs
    if len(inputs) != 1 or inputs[0].dtype != np.float32 or not _fits(inputs[0], input_shape):
        raise ModelLoadError(
            f"{session.path}: {label} input: expected one input "
            f"{format_shape_dtype(input_shape, np.float32)}, found {format_specs(inputs)}",
            session.path,
        )
    _first_output(session, output_shape, label)


def read_npy(path: Path, what: str) -> np.ndarray:
    """The array in a .npy file; ModelLoadError naming the file (`what` it is) when it is missing or
    unreadable."""
    path = Path(path)
    if not path.is_file():
        raise missing_file_error(path, what)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable .npy file: {exc}", path) from exc


def load_time_inputs(path: Path) -> np.ndarray:
    """float32 [4,1280]: the first four rows of a [N>=4,1280] .npy (rows for 999, 759, 499, 259)."""
    path = Path(path)
    rows = read_npy(path, "time input file")
    if rows.ndim != 2 or rows.shape[0] < len(TIMESTEPS) or rows.shape[1] != TIME_DIM:
        raise ModelLoadError(
            f"{path}: time rows: expected float32[N>=4,{TIME_DIM}], "
            f"found {format_shape_dtype(rows.shape, rows.dtype)}",
            path,
        )
    if not np.issubdtype(rows.dtype, np.floating):
        raise ModelLoadError(f"{path}: time rows: expected float32, found {rows.dtype}", path)
    return np.ascontiguousarray(rows[: len(TIMESTEPS)], dtype=np.float32)


def load_time_table(path: Path) -> np.ndarray:
    """float32 [1000,1280], finite: the UNet's time input for every timestep 0..999."""
    path = Path(path)
    table = read_npy(path, "time table")
    if table.shape != TIME_TABLE_SHAPE or table.dtype != np.float32:
        raise ModelLoadError(
            f"{path}: time table: expected {format_shape_dtype(TIME_TABLE_SHAPE, np.float32)}, "
            f"found {format_shape_dtype(table.shape, table.dtype)}",
            path,
        )
    bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if bad.size:
        raise ModelLoadError(f"{path}: time table: non-finite values in the rows of t = {bad[:5].tolist()}",
                             path)
    return np.ascontiguousarray(table)


@dataclass(frozen=True)
class TimeInputs:
    """The UNet's time input rows a model folder provides: from a full table (every t = 0..999) the
    rows of the LCM skeleton, which every LCM schedule runs (50 rows: 256 KB instead of 5 MB per
    device), or the four upstream rows (999, 759, 499, 259). `full` decides which LCM schedules
    can run (pipeline.scheduler)."""

    rows: np.ndarray  # float32 [N,1280], row i for timesteps[i]
    timesteps: tuple[int, ...]
    source: Path
    full: bool  # True when it came from a full table: any LCM schedule can run

    @classmethod
    def from_table(cls, table: np.ndarray, source: Path) -> TimeInputs:
        return cls(np.ascontiguousarray(table[list(LCM_SKELETON)]), LCM_SKELETON, Path(source), True)

    @classmethod
    def from_four_rows(cls, rows: np.ndarray, source: Path) -> TimeInputs:
        return cls(rows, TIMESTEPS, Path(source), False)

    @property
    def four_rows(self) -> np.ndarray:
        """float32 [4,1280]: the rows of 999, 759, 499, 259 (what time_input_txt2img.npy holds)."""
        return np.stack([self.row(t)[0] for t in TIMESTEPS])

    def has(self, t: int) -> bool:
        return int(t) in self.timesteps

    def row(self, t: int) -> np.ndarray:
        """float32 [1,1280]: the UNet's time input at timestep `t` (KeyError when there is none)."""
        if not self.has(t):
            raise KeyError(f"no time input row for timestep {t} in {self.source}")
        return self.rows[self.timesteps.index(int(t))][None]


def check_time_rows_agree(table: TimeInputs, rows: np.ndarray, rows_path: Path) -> None:
    """A table and a four-row file next to each other must come from the same UNet."""
    diff = np.abs(table.four_rows - rows).max(axis=1)
    scale = np.abs(rows).max(axis=1)
    limit = TIME_ROWS_TOLERANCE * np.maximum(scale, 1.0)
    bad = [(t, float(d)) for t, d, lim in zip(TIMESTEPS, diff, limit, strict=True) if d > lim]
    if bad:
        worst = ", ".join(f"t={t}: {d:.3g}" for t, d in bad)
        raise ModelLoadError(
            f"{table.source} does not match {rows_path} (max abs difference {worst}): they come from "
            "different UNets; recompute the table from this model's UNet (`pi-axera-sd time-table`) "
            "or remove one of the two files",
            table.source,
        )


def check_tokenizer_dir(folder: Path) -> None:
    """The folder holds vocab.json (a JSON object) and merges.txt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(
            f"tokenizer folder not found: {folder} (expected {', '.join(TOKENIZER_FILES)})", folder
        )
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            raise ModelLoadError(f"tokenizer folder {folder} is missing {name}", folder / name)
    vocab_path = folder / "vocab.json"
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{vocab_path}: not readable JSON: {exc}", vocab_path) from exc
    if not isinstance(vocab, dict) or not vocab:
        raise ModelLoadError(f"{vocab_path}: expected a JSON object of token -> id", vocab_path)
