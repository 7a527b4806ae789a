"""NodeArg: name, numpy dtype, shape list (pyaxengine's constructor order is name, dtype, shape)."""

from __future__ import annotations

from typing import Any


class NodeArg:
    def __init__(self, name: str, dtype: Any, shape: list[int]) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape

    def __repr__(self) -> str:
        return f"NodeArg({self.name!r}, {self.dtype}, {self.shape})"
