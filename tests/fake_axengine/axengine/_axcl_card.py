"""What libaxcl_rt does natively, simulated: the runtime init, the cards, per-thread contexts, locks.

AXCL binds a context to the calling thread (`axclrtSetDevice` makes the device's context current
there); an engine call from a thread whose current context is not the model's device fails.
Each card runs one model at a time (a lock per device).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_DEVICES = 256  # AXCL_MAX_DEVICE_COUNT
FIRST_BUS_ID = 0x81  # AXCL device ids are PCIe bus numbers, not 0..n-1
ERROR_INIT = -1
ERROR_NO_CONTEXT = 0x8003_0011  # stand-in value: engine call without the model's context
ERROR_BAD_DEVICE = 0x8003_0002  # stand-in value: unknown device id


@dataclass(frozen=True)
class Context:
    device_id: int


_thread = threading.local()
_contexts: dict[int, Context] = {}
_locks: dict[int, threading.Lock] = {}
_table_lock = threading.Lock()


def init() -> int:
    """axclInit: 0, or an error code when FAKE_AXCL_FAIL=init."""
    return ERROR_INIT if os.environ.get("FAKE_AXCL_FAIL") == "init" else 0


def device_ids() -> list[int]:
    """The cards found (FAKE_AXCL_DEVICES, default 1), as AXCL device ids."""
    count = int(os.environ.get("FAKE_AXCL_DEVICES", "1"))
    return [FIRST_BUS_ID + index for index in range(min(count, MAX_DEVICES))]


def set_device(device_id: int) -> int:
    """axclrtSetDevice: the device's context becomes current on this thread."""
    if device_id not in device_ids():
        return ERROR_BAD_DEVICE
    with _table_lock:
        context = _contexts.setdefault(device_id, Context(device_id))
        _locks.setdefault(device_id, threading.Lock())
    _thread.context = context
    return 0


def current_context() -> Context | None:
    return getattr(_thread, "context", None)


def set_current_context(context: Context) -> int:
    _thread.context = context
    return 0


def execute(device_id: int, work: Callable[[], Any]) -> tuple[int, Any]:
    """Run `work` on the device when this thread's current context is that device's, one at a time."""
    context = current_context()
    if context is None or context.device_id != device_id:
        return ERROR_NO_CONTEXT, None
    with _locks[device_id]:
        return 0, work()
