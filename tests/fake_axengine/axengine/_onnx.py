"""The model behind a fake session: the `.axmodel` file is an ONNX graph, run on onnxruntime's CPU."""

from __future__ import annotations

import numpy as np
import onnxruntime

from ._node import NodeArg

# The tensor types pyaxengine maps to numpy (8/16/32-bit integers, float32; bf16 has no ONNX twin here).
READABLE = {
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(float)": np.dtype(np.float32),
}


class OnnxModel:
    """Inputs/outputs as NodeArgs, and a run that returns every output in model order."""

    def __init__(self, source: str | bytes, type_numbers: dict[str, int]) -> None:
        self._session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
        self._type_numbers = type_numbers  # the runtime's number for a type it cannot read

    def _node_args(self, args: list) -> list[NodeArg]:
        nodes = []
        for arg in args:
            if arg.type not in READABLE:  # pyaxengine: ValueError while reading the model's I/O
                raise ValueError(f"Unsupported data type '{self._type_numbers.get(arg.type, 0)}'.")
            nodes.append(NodeArg(arg.name, READABLE[arg.type], [int(d) for d in arg.shape]))
        return nodes

    def inputs(self) -> list[NodeArg]:
        return self._node_args(self._session.get_inputs())

    def outputs(self) -> list[NodeArg]:
        return self._node_args(self._session.get_outputs())

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session.run(None, feed))
