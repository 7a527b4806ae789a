"""`axclrt_cffi` / `axclrt_lib` as pyaxengine names them: here only the device list is offered
(what a caller outside pyaxengine uses to count the cards). Loading fails with FAKE_AXCL_FAIL=dlopen
the way cffi reports a library that exists but cannot be loaded.
"""

from __future__ import annotations

import os
from typing import Any

from . import _axcl_card

if os.environ.get("FAKE_AXCL_FAIL") == "dlopen":
    raise OSError(
        "cannot load library 'libaxcl_rt.so': libaxcl_pcie_msg.so: cannot open shared object file: "
        "No such file or directory"
    )


class _DeviceList:
    def __init__(self) -> None:
        self.num = 0
        self.devices = [0] * _axcl_card.MAX_DEVICES


class _Ffi:
    def new(self, ctype: str) -> Any:
        if ctype.replace(" ", "") == "axclrtDeviceList*":
            return _DeviceList()
        raise NotImplementedError(f"the fake axclrt_cffi only makes axclrtDeviceList, not {ctype!r}")


class _Lib:
    def axclrtGetDeviceList(self, device_list: _DeviceList) -> int:  # noqa: N802  (the C name)
        ids = _axcl_card.device_ids()
        device_list.num = len(ids)
        device_list.devices[: len(ids)] = ids
        return 0


axclrt_cffi = _Ffi()
axclrt_lib = _Lib()
