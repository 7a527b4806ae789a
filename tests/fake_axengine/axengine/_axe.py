"""The on-board path (AxEngineExecutionProvider, code running on an AX650N board).

Importing this module initialises the board runtime once and prints chip type, VNPU type and
engine version; each session prints model type and compiler version. `provider_options` is not
read (the board has one NPU). FAKE_AXE_FAIL=init makes the runtime init fail as AX_SYS_Init does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._base_session import FakeSessionBase
from ._onnx import OnnxModel

ENGINE_VERSION = "0.0-fake"
COMPILER_VERSION = "0.0-fake onnxruntime"
AXE_TYPE_NUMBERS = {"tensor(double)": 8}  # AX_ENGINE_DT_FLOAT64; int64/float16 have no number: 0

if os.environ.get("FAKE_AXE_FAIL") == "init":
    raise RuntimeError("Failed to initialize ax sys.")
print("[INFO] Chip type: ChipType.MC50")
print("[INFO] VNPU type: VNPUType.DISABLED")
print(f"[INFO] Engine version: {ENGINE_VERSION}")


class AXEngineSession(FakeSessionBase):
    def __init__(
        self,
        path_or_bytes: str | bytes | os.PathLike,
        sess_options: Any = None,
        provider_options: list[dict[Any, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(path_or_bytes, (str, os.PathLike)):
            source: str | bytes = Path(path_or_bytes).read_bytes()  # FileNotFoundError, as open() does
        elif isinstance(path_or_bytes, bytes):
            source = path_or_bytes
        else:
            raise TypeError(f"Unable to load model from type '{type(path_or_bytes)}'")
        print("[INFO] Model type: 0 (single core)")
        try:
            self._handle = OnnxModel(source, AXE_TYPE_NUMBERS)
        except Exception:  # noqa: BLE001
            raise RuntimeError("Failed to load model.") from None
        print(f"[INFO] Compiler version: {COMPILER_VERSION}")
        self._inputs = self._handle.inputs()
        self._outputs = self._handle.outputs()

    def __del__(self) -> None:
        handle, self._handle = self._handle, None  # AttributeError when the model was never read
        del handle

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: Any = None,
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        feed = self._checked_feed(output_names, input_feed)
        self._check_group(shape_group)
        return self._select_outputs(output_names, self._handle.run(feed))
