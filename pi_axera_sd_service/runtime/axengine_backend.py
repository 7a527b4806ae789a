"""AxEngineSession: a Session over pyaxengine (`import axengine`) on the AX650N NPU.

Provider: `AXCLRTExecutionProvider` (M.2 card on a Pi) when the card's device node exists or it is
the only one offered, else `AxEngineExecutionProvider` (on-board), as pyaxengine 0.1.3rc3 orders them.
The device goes in `provider_options=[{"device_id": N}]`;
the `(name, dict)` tuple form does not select the device in pyaxengine 0.1.3.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .session import FeedError, ModelLoadError, TensorSpec, format_shape_dtype, prepare_feed

AXCLRT_PROVIDER = "AXCLRTExecutionProvider"
AXENGINE_PROVIDER = "AxEngineExecutionProvider"
AXCL_DEVICE_NODE = Path("/dev/axcl_host")  # present when an AXCL (M.2/PCIe) card is attached

INSTALL_HINT = (
    "install the pyaxengine wheel (AXERA-TECH/pyaxengine releases) and make sure the native library "
    "is found: libaxcl_rt.so for the M.2 card (source /etc/profile or add /usr/lib/axcl to "
    "LD_LIBRARY_PATH), libax_engine.so on the board"
)


@functools.lru_cache(maxsize=1)
def axengine_import_error() -> str | None:
    """None when `import axengine` works, else why not (cached: the import initialises the runtime)."""
    try:
        import axengine  # noqa: F401
    except ImportError as exc:  # also raised by pyaxengine when no native provider library is found
        return str(exc) or exc.__class__.__name__
    except OSError as exc:  # a native library that exists but cannot be loaded
        return str(exc)
    return None


def _import_axengine() -> Any:
    reason = axengine_import_error()
    if reason is not None:
        raise ModelLoadError(f"the axengine backend is unavailable: {reason}; {INSTALL_HINT}")
    import axengine

    return axengine


def choose_provider(available: list[str], card_present: bool | None = None) -> str:
    """AXCLRT when a card is attached (or AXCLRT is all there is), else AxEngine (board).

    The wheel in the fork (0.1.3rc2) lists AXCLRT first whenever libaxcl_rt is found, even on a
    board without a card; `card_present` defaults to whether AXCL_DEVICE_NODE exists.
    """
    if card_present is None:
        card_present = AXCL_DEVICE_NODE.exists()
    order = (AXCLRT_PROVIDER, AXENGINE_PROVIDER) if card_present else (AXENGINE_PROVIDER, AXCLRT_PROVIDER)
    for name in order:
        if name in available:
            return name
    raise ModelLoadError(f"axengine offers no NPU provider (available: {available}); {INSTALL_HINT}")


class AxEngineSession:
    """A Session over `axengine.InferenceSession` on one NPU device."""

    backend = "axengine"

    def __init__(self, path: Path | str, device_id: int = 0, provider: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"model file not found: {self.path}", self.path)
        axengine = _import_axengine()
        self.provider = provider or choose_provider(list(axengine.get_available_providers()))
        self.device_id = device_id
        try:
            self._session = axengine.InferenceSession(
                str(self.path), providers=[self.provider], provider_options=[{"device_id": device_id}]
            )
        except Exception as exc:  # pyaxengine raises RuntimeError/ValueError/AssertionError
            raise ModelLoadError(
                f"{self.path}: axengine ({self.provider}, device {device_id}) cannot load the model: {exc}",
                self.path,
            ) from exc
        self.inputs = [self._spec(arg) for arg in self._session.get_inputs()]
        self.outputs = [self._spec(arg) for arg in self._session.get_outputs()]

    @staticmethod
    def _spec(node_arg: Any) -> TensorSpec:
        return TensorSpec(node_arg.name, tuple(int(d) for d in node_arg.shape), np.dtype(node_arg.dtype))

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run with every output returned; the feed is cast and checked first (axengine asserts it)."""
        prepared = prepare_feed(self, feed)
        try:
            return list(self._session.run(None, prepared))
        except AssertionError as exc:  # pyaxengine's shape/dtype assert; prepare_feed should prevent it
            found = ", ".join(f"{k} {format_shape_dtype(v.shape, v.dtype)}" for k, v in prepared.items())
            raise FeedError(f"{self.path.name}: axengine rejected the feed ({exc}); found {found}") from exc

    def __repr__(self) -> str:
        return f"AxEngineSession({str(self.path)!r}, device_id={self.device_id}, provider={self.provider!r})"
