"""A few helpers over onnx.helper for the demo pack's generated graphs (onnx is imported lazily)."""

from __future__ import annotations

import numpy as np

OPSET = 17


class Graph:
    """A few helpers over onnx.helper so each model reads as a list of ops."""

    def __init__(self) -> None:
        import onnx  # imported here: only the CPU/demo path needs it

        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, array: np.ndarray, name: str | None = None) -> str:
        name = name or f"const_{len(self.initializers)}"
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: object) -> str:
        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def model(
        self, name: str, inputs: list[tuple[str, int, list[int]]], outputs: list[tuple[str, list[int]]]
    ):
        helper, tp = self.onnx.helper, self.onnx.TensorProto
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(n, dtype, shape) for n, dtype, shape in inputs],
            [helper.make_tensor_value_info(n, tp.FLOAT, shape) for n, shape in outputs],
            self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="pi_axera_sd_service demo pack",
        )
        model.ir_version = 8
        self.onnx.checker.check_model(model)
        return model


def f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)
