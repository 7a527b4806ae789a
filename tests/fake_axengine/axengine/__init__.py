"""Stand-in for pyaxengine (`import axengine`) backed by onnxruntime, for tests.

Same API as pyaxengine 0.1.3: `InferenceSession(path_or_bytes, sess_options=None, providers=None,
provider_options=None, **kwargs)`, `get_inputs()/get_outputs()` -> NodeArg(.name, .shape list,
.dtype numpy dtype), `get_providers()` -> str, `run(output_names, input_feed)` asserting exact shape
and dtype, `get_available_providers()`. A path `x.axmodel` runs the sibling `x.onnx`; int64 inputs are
reported as int32 (like the compiled text encoder) and converted back before onnxruntime runs.
Every session created is recorded in `created` (path, provider, provider_options) for assertions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

AVAILABLE_PROVIDERS: list[str] = ["AXCLRTExecutionProvider", "AxEngineExecutionProvider"]
created: list[dict[str, Any]] = []

_ORT_TO_NUMPY = {
    "tensor(float)": np.dtype("float32"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(int32)": np.dtype("int32"),
}


def get_available_providers() -> list[str]:
    return list(AVAILABLE_PROVIDERS)


@dataclass
class NodeArg:
    name: str
    shape: list[int]
    dtype: np.dtype


class SessionOptions:
    """Empty, as in pyaxengine."""


class InferenceSession:
    def __init__(
        self,
        path_or_bytes: str | bytes | os.PathLike,
        sess_options: SessionOptions | None = None,
        providers: str | list[Any] | None = None,
        provider_options: list[dict[Any, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._provider = self._select(providers)
        if isinstance(path_or_bytes, bytes):
            source: Any = path_or_bytes
        else:
            path = Path(path_or_bytes)
            if not path.is_file():
                raise RuntimeError(f"load model failed: {path}")
            source = str(path.with_suffix(".onnx") if path.suffix == ".axmodel" else path)
        self._ort = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
        self._ort_dtypes = {a.name: _ORT_TO_NUMPY[a.type] for a in self._ort.get_inputs()}
        created.append(
            {"path": path_or_bytes, "provider": self._provider, "provider_options": provider_options}
        )

    @staticmethod
    def _select(providers: str | list[Any] | None) -> str:
        available = get_available_providers()
        if providers is None:
            return available[0]
        if isinstance(providers, str):
            if providers not in available:
                raise ValueError(f"Selected provider: '{providers}' is not available.")
            return providers
        for entry in providers:
            name = entry[0] if isinstance(entry, tuple) else entry
            if name in available:
                return name
        raise ValueError(f"Selected provider(s): {providers} is(are) not available.")

    def get_providers(self) -> str:
        return self._provider

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        return [
            NodeArg(a.name, list(a.shape), np.dtype("int32") if dtype == np.int64 else dtype)
            for a, dtype in ((a, self._ort_dtypes[a.name]) for a in self._ort.get_inputs())
        ]

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        return [NodeArg(a.name, list(a.shape), _ORT_TO_NUMPY[a.type]) for a in self._ort.get_outputs()]

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: object | None = None,
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        feed: dict[str, np.ndarray] = {}
        for node in self.get_inputs(shape_group):
            if node.name not in input_feed:
                raise ValueError(f"input {node.name} not found in input_feed")
            array = input_feed[node.name]
            assert list(array.shape) == node.shape and array.dtype == node.dtype, (
                f"model inputs({node.name}) expect shape {node.shape} and dtype {node.dtype}, "
                f"however gets input with shape {list(array.shape)} and dtype {array.dtype}"
            )
            feed[node.name] = array.astype(self._ort_dtypes[node.name])
        return list(self._ort.run(output_names, feed))
