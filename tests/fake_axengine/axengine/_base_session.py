"""SessionOptions (empty, as in pyaxengine) and what both provider paths share: I/O lists and the
checks `run()` makes before touching the device."""

from __future__ import annotations

import numpy as np

from ._node import NodeArg


class SessionOptions:
    pass


class FakeSessionBase:
    """Holds one shape group of inputs/outputs (the published models have one)."""

    _inputs: list[NodeArg]
    _outputs: list[NodeArg]

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        self._check_group(shape_group)
        return self._inputs

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        self._check_group(shape_group)
        return self._outputs

    @staticmethod
    def _check_group(shape_group: int) -> None:
        if shape_group != 0:
            raise ValueError(f"Invalid shape group: {shape_group}")

    def _checked_feed(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray]) -> dict:
        """The feed for the model; raises as pyaxengine does for missing inputs, unknown outputs, or a
        shape/dtype that is not exactly the model's (AssertionError; no casting)."""
        missing = [node.name for node in self._inputs if node.name not in input_feed]
        if missing:
            raise ValueError(f"Required inputs ({missing}) are missing from input feed ({input_feed}).")
        for name in output_names or []:
            if name not in [node.name for node in self._outputs]:
                raise ValueError(f"Output name '{name}' is not in model outputs name list.")
        feed = {}
        for node in self._inputs:
            array = input_feed[node.name]
            assert list(array.shape) == list(node.shape) and array.dtype == node.dtype, (
                f"model inputs({node.name}) expect shape {node.shape} and dtype {node.dtype}, "
                f"however gets input with shape {array.shape} and dtype {array.dtype}"
            )
            feed[node.name] = np.ascontiguousarray(array)
        return feed

    def _select_outputs(self, output_names: list[str] | None, results: list[np.ndarray]) -> list[np.ndarray]:
        """Fresh arrays (never a view of a device buffer), in model order. As in pyaxengine 0.1.3,
        a strict subset of output names raises ValueError (each model output is looked up in it)."""
        wanted = output_names if output_names is not None else [node.name for node in self._outputs]
        for node in self._outputs:
            wanted.index(node.name)
        return [np.array(result, copy=True) for result in results]
