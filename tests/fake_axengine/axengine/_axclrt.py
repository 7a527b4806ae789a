"""The AXCLRT (M.2 / PCIe card) path, as pyaxengine 0.1.3 behaves on a card host.

- Importing this module initialises the runtime once (pyaxengine imports it at the first AXCLRT
  session): RuntimeError "Failed to initialize axcl runtime. <ret>." when axclInit fails, OSError
  when the library cannot be loaded (`_axclrt_capi`). A failed import is retried by the next session.
- A session reads `provider_options[0]["device_id"]` (default 0) as an index into the card list:
  RuntimeError "Device index N is out of range, total M device." when there is no such card.
- Creating a session makes that card's context current on the creating thread, prints SOC name,
  VNPU type and compiler version, and keeps the session in `_all_model_instances` until exit
  (never freed earlier). A session that fails half-way raises from `__del__`, which Python prints
  as "Exception ignored in: <function AXCLRTSession.__del__ ...>".
- `run()` makes the creating thread's context current again before executing (so any thread may
  run it); RESTORE_CONTEXT_ON_RUN = False shows what happens without that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import _axcl_card
from ._axclrt_capi import axclrt_lib  # noqa: F401  (loading the library comes first, as in pyaxengine)
from ._base_session import FakeSessionBase
from ._onnx import OnnxModel

SOC_NAME = "AX650N"
COMPILER_VERSION = "0.0-fake onnxruntime"
AXCL_TYPE_NUMBERS = {"tensor(int64)": 9, "tensor(uint64)": 10, "tensor(float16)": 13}
RESTORE_CONTEXT_ON_RUN = True

_all_model_instances: list[AXCLRTSession] = []

_ret = _axcl_card.init()
if _ret != 0:
    raise RuntimeError(f"Failed to initialize axcl runtime. {_ret}.")


class AXCLRTSession(FakeSessionBase):
    def __init__(
        self,
        path_or_bytes: str | bytes | os.PathLike,
        sess_options: Any = None,
        provider_options: list[dict[Any, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model = None
        self._model_id: list[int] | None = None  # set once the device is up; __del__ reads it
        index = 0
        if provider_options is not None and "device_id" in provider_options[0]:
            index = provider_options[0]["device_id"]
        cards = _axcl_card.device_ids()
        if not cards:
            raise RuntimeError(f"Get AXCL device failed 0x{0:08x}, find total {len(cards)} device.")
        if index >= len(cards):
            raise RuntimeError(f"Device index {index} is out of range, total {len(cards)} device.")
        self._device = cards[index]
        ret = _axcl_card.set_device(self._device)
        if ret != 0:
            raise RuntimeError(f"Set AXCL device failed 0x{ret:08x}.")
        print(f"[INFO] SOC Name: {SOC_NAME}")
        self._context = _axcl_card.current_context()
        self._model_id = [0]
        print("[INFO] VNPU type: VNPUType.DISABLED")
        self._model = self._load(path_or_bytes)
        self._model_id[0] = id(self._model)
        print(f"[INFO] Compiler version: {COMPILER_VERSION}")
        self._inputs = self._model.inputs()
        self._outputs = self._model.outputs()
        _all_model_instances.append(self)

    @staticmethod
    def _load(path_or_bytes: Any) -> OnnxModel:
        if isinstance(path_or_bytes, (str, os.PathLike)):
            path = path_or_bytes.encode("utf-8")  # as pyaxengine: a str works, a Path raises here
            source: str | bytes = path.decode("utf-8")
            if not Path(source).is_file():
                raise RuntimeError("axclrtEngineLoadFromFile failed.")
        elif isinstance(path_or_bytes, bytes):
            source = path_or_bytes
        else:
            raise TypeError(f"Unable to load model from type '{type(path_or_bytes)}'")
        try:
            return OnnxModel(source, AXCL_TYPE_NUMBERS)
        except Exception:  # noqa: BLE001  (onnxruntime's own exception types)
            raise RuntimeError("axclrtEngineLoadFromFile failed.") from None

    def __del__(self) -> None:
        if self._model_id[0] != 0:  # TypeError when the session failed before the device was set
            self._model_id[0] = 0
        _all_model_instances.remove(self)  # ValueError when the session never finished

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: Any = None,
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        feed = self._checked_feed(output_names, input_feed)
        if RESTORE_CONTEXT_ON_RUN:
            _axcl_card.set_current_context(self._context)
        self._check_group(shape_group)
        ret, results = _axcl_card.execute(self._device, lambda: self._model.run(feed))
        if ret != 0:
            raise RuntimeError(f"axclrtEngineExecute failed 0x{ret:08x}")
        return self._select_outputs(output_names, results)
