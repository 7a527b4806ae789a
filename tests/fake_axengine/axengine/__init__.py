"""Stand-in for pyaxengine 0.1.3 (`import axengine`) for tests: the real Python layer's observable
behaviour, read from AXERA-TECH/pyaxengine (tag 0.1.3.rc3), over onnxruntime instead of an NPU.

What it mirrors (each module says more):
- import: `[INFO] Available providers:  [...]` on stdout; ImportError when no provider is found.
- `InferenceSession(path_or_bytes, sess_options, providers, provider_options)`: provider selection
  and its prints (`_session`), then the AXCLRT path (`_axclrt`: device list, out-of-range error,
  per-thread context, SOC/VNPU/compiler prints) or the on-board path (`_axe`).
- only 8/16/32-bit integer and float32 tensors load ("Unsupported data type" at session creation);
  a failed session's `__del__` raises, which Python prints as "Exception ignored in ...".
- `run()` asserts exact shape and dtype and returns fresh arrays.

An `.axmodel` here is an ONNX file (see `fake_axengine/axmodels.py`), run on onnxruntime's CPU
provider, so outputs are real. Knobs for tests (environment, read when used):
  FAKE_AXENGINE_PROVIDERS  comma list of providers found (default: both, ordered as pyaxengine does)
  FAKE_AXCL_DEVICES        number of AXCL cards (default 1)
  FAKE_AXCL_FAIL           "init": axclInit fails; "dlopen": libaxcl_rt.so cannot be loaded
  FAKE_AXE_FAIL            "init": the on-board runtime (AX_SYS_Init) fails
Every session created is recorded in `created` (path, provider, provider_options, thread).
"""

from ._node import NodeArg
from ._providers import (
    axclrt_provider_name,
    axengine_provider_name,
    get_all_providers,
    get_available_providers,
)
from ._record import created

if not get_available_providers():
    raise ImportError(
        f"No providers found. Please make sure you have installed one of the following: {get_all_providers()}"
    )
print("[INFO] Available providers: ", get_available_providers())

from ._session import InferenceSession, SessionOptions  # noqa: E402  (after the check, as pyaxengine)

__all__ = [
    "InferenceSession",
    "NodeArg",
    "SessionOptions",
    "axclrt_provider_name",
    "axengine_provider_name",
    "created",
    "get_all_providers",
    "get_available_providers",
]
