"""OnnxSession: a Session over onnxruntime on the CPU (development machines and the demo pack)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .session import DYNAMIC, ModelLoadError, TensorSpec, prepare_feed

ORT_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype("float32"),
    "tensor(float16)": np.dtype("float16"),
    "tensor(double)": np.dtype("float64"),
    "tensor(int8)": np.dtype("int8"),
    "tensor(int16)": np.dtype("int16"),
    "tensor(int32)": np.dtype("int32"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(uint8)": np.dtype("uint8"),
    "tensor(uint16)": np.dtype("uint16"),
    "tensor(uint32)": np.dtype("uint32"),
    "tensor(uint64)": np.dtype("uint64"),
    "tensor(bool)": np.dtype("bool"),
}


def ort_dtype(type_string: str) -> np.dtype:
    """Map an onnxruntime type string such as 'tensor(float)' to a numpy dtype."""
    try:
        return ORT_TYPES[type_string]
    except KeyError:
        raise ValueError(f"unsupported ONNX tensor type {type_string!r}") from None


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelLoadError(
            f"the onnxruntime backend needs the 'onnxruntime' package ({exc}); "
            "install it with: pip install 'pi_axera_sd_service[onnx]'"
        ) from exc
    return onnxruntime


def _spec(node_arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else DYNAMIC for d in (node_arg.shape or []))
    return TensorSpec(node_arg.name, shape, ort_dtype(node_arg.type))


class OnnxSession:
    """A Session over `onnxruntime.InferenceSession` with the CPU provider."""

    backend = "onnxruntime"

    def __init__(self, path: Path | str, threads: int | None = None, memory_arena: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"model file not found: {self.path}", self.path)
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Idle intra-op threads would spin after every run: CPU time taken from the HTTP side and
        # from other devices' workers, for no change in the results.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Without the arena each run's buffers go back to malloc (flat RSS) at some CPU per run.
        options.enable_cpu_mem_arena = memory_arena
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{self.path}: onnxruntime cannot load the model: {exc}", self.path) from exc
        try:
            self.inputs = [_spec(arg) for arg in self._session.get_inputs()]
            self.outputs = [_spec(arg) for arg in self._session.get_outputs()]
        except ValueError as exc:
            raise ModelLoadError(f"{self.path}: {exc}", self.path) from exc

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run with every output returned, after casting/checking the feed."""
        return list(self._session.run(None, prepare_feed(self, feed)))

    def __repr__(self) -> str:
        return f"OnnxSession({str(self.path)!r})"
