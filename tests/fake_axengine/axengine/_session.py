"""InferenceSession: pyaxengine 0.1.3's provider selection, then the AXCLRT or on-board session.

`providers`: None takes the first available one; a str must be available (ValueError); a list of
names or (name, options) tuples takes the first available entry, prints a [WARNING] naming the
unavailable ones, and raises ValueError when none is available. Then "[INFO] Using provider: X".
Only `provider_options[0]["device_id"]` selects the card (the options of a tuple entry are kept
but never read by the AXCLRT path).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from ._base_session import SessionOptions
from ._node import NodeArg
from ._providers import axclrt_provider_name, axengine_provider_name, get_available_providers
from ._record import created

__all__ = ["InferenceSession", "SessionOptions"]


def _select_provider(providers: Any) -> str:
    available = get_available_providers()
    if providers is None:
        return available[0]
    if isinstance(providers, str):
        if providers not in available:
            raise ValueError(f"Selected provider: '{providers}' is not available.")
        return providers
    chosen, unavailable = None, []
    for entry in providers:
        assert isinstance(entry, (str, tuple)), f"Invalid provider type: {type(entry)}. Must be str or tuple."
        name = entry[0] if isinstance(entry, tuple) else entry
        if name not in available:
            unavailable.append(name)
        elif chosen is None:
            chosen = name
    if unavailable:
        if chosen is None:
            raise ValueError(f"Selected provider(s): {unavailable} is(are) not available.")
        print(f"[WARNING] Selected provider(s): {unavailable} is(are) not available.")
    if chosen is None:
        raise ValueError(f"No available provider found in {providers}.")
    return chosen


class InferenceSession:
    def __init__(
        self,
        path_or_bytes: str | bytes | os.PathLike,
        sess_options: SessionOptions | None = None,
        providers: Any = None,
        provider_options: list[dict[Any, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._sess_options = sess_options
        self._provider = _select_provider(providers)
        print(f"[INFO] Using provider: {self._provider}")
        if self._provider == axclrt_provider_name:
            from ._axclrt import AXCLRTSession

            self._sess: Any = AXCLRTSession(path_or_bytes, sess_options, provider_options, **kwargs)
        elif self._provider == axengine_provider_name:
            from ._axe import AXEngineSession

            self._sess = AXEngineSession(path_or_bytes, sess_options, provider_options, **kwargs)
        else:
            raise RuntimeError(f"Create session failed with provider: {self._provider}")
        created.append(
            {
                "path": path_or_bytes,
                "provider": self._provider,
                "provider_options": provider_options,
                "thread": threading.get_ident(),
            }
        )

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info: Any) -> bool:
        return False

    def get_session_options(self) -> SessionOptions | None:
        return self._sess_options

    def get_providers(self) -> str:
        return self._provider

    def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._sess.get_inputs(shape_group)

    def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
        return self._sess.get_outputs(shape_group)

    def run(
        self,
        output_names: list[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: Any = None,
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        return self._sess.run(output_names, input_feed, run_options, shape_group)
