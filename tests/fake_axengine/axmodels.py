"""`.axmodel` files for the fake axengine: ONNX graphs with the compiled models' I/O contract.

The published text encoder takes int32 `input_ids` (Pulsar2 compiled it so); the demo pack's ONNX
takes int64, as the upstream ONNX export does. `compile_axmodel` writes the int32 form (a Cast in
front of the graph); `copy_as_axmodel` keeps the file as it is (an int64 axmodel, which pyaxengine
cannot load).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def compile_axmodel(onnx_file: Path, axmodel_file: Path | None = None) -> Path:
    """Write `onnx_file` as an `.axmodel` whose int64 inputs are int32 (cast inside the graph)."""
    onnx_file = Path(onnx_file)
    target = Path(axmodel_file) if axmodel_file is not None else onnx_file.with_suffix(".axmodel")
    model = onnx.load(str(onnx_file))
    graph = model.graph
    casts = []
    for graph_input in graph.input:
        if graph_input.type.tensor_type.elem_type != TensorProto.INT64:
            continue
        inner = f"{graph_input.name}__int64"
        for node in graph.node:
            node.input[:] = [inner if name == graph_input.name else name for name in node.input]
        casts.append(helper.make_node("Cast", [graph_input.name], [inner], to=TensorProto.INT64))
        graph_input.type.tensor_type.elem_type = TensorProto.INT32
    for index, cast in enumerate(casts):
        graph.node.insert(index, cast)
    onnx.save_model(model, str(target))
    return target


def copy_as_axmodel(onnx_file: Path) -> Path:
    """The same graph under the `.axmodel` name (int64 inputs stay int64)."""
    return Path(shutil.copy(onnx_file, Path(onnx_file).with_suffix(".axmodel")))


def axmodel_pack(folder: Path, remove_onnx: bool = False) -> Path:
    """Give every `.onnx` in a model folder its compiled `.axmodel` twin (optionally drop the `.onnx`)."""
    for onnx_file in sorted(Path(folder).rglob("*.onnx")):
        compile_axmodel(onnx_file)
        if remove_onnx:
            onnx_file.unlink()
    return Path(folder)
