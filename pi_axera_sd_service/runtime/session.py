"""What every model backend provides: tensor specs, the Session protocol, and feed checking."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

DYNAMIC = -1  # a dimension the model does not fix (ONNX symbolic dims)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and numpy dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def describe(self) -> str:
        """`input_ids int32[1,77]`."""
        return f"{self.name} {format_shape_dtype(self.shape, self.dtype)}"

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        """True when `shape` fits (dynamic dims match anything)."""
        return len(shape) == len(self.shape) and all(
            want in (DYNAMIC, got) for want, got in zip(self.shape, shape, strict=True)
        )


@runtime_checkable
class Session(Protocol):
    """One loaded model. `run` returns every output, in model order."""

    path: Path
    backend: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class ModelLoadError(Exception):
    """A model file is missing or does not match the I/O contract (the message says what and where)."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


class FeedError(ValueError):
    """An array given to `run` does not fit the model input (message names file, input, expected, found)."""


def format_shape_dtype(shape: Sequence[int], dtype: np.dtype | type | str) -> str:
    """`float32[1,4,64,64]`; dynamic dims print as `?`."""
    dims = ",".join("?" if d == DYNAMIC else str(d) for d in shape)
    return f"{np.dtype(dtype).name}[{dims}]"


def format_specs(specs: Sequence[TensorSpec]) -> str:
    """`a float32[1,4], b int32[1,77]`."""
    return ", ".join(spec.describe() for spec in specs) or "(none)"


def prepare_feed(session: Session, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast each array to the dtype the session reports and check its shape.

    Returns a new dict holding exactly the session's inputs, contiguous, in the model's dtypes.
    Raises FeedError naming the model file, the input, what was expected and what was found.
    """
    prepared: dict[str, np.ndarray] = {}
    for spec in session.inputs:
        if spec.name not in feed:
            raise FeedError(
                f"{session.path.name}: input {spec.name!r} missing from the feed "
                f"(expected {format_shape_dtype(spec.shape, spec.dtype)}, found keys {sorted(feed)})"
            )
        array = np.asarray(feed[spec.name])
        if not spec.accepts_shape(array.shape):
            expected = format_shape_dtype(spec.shape, spec.dtype)
            found = format_shape_dtype(array.shape, array.dtype)
            raise FeedError(f"{session.path.name}: input {spec.name!r} expected {expected}, found {found}")
        prepared[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
    return prepared
