"""AxEngineSession: a Session over pyaxengine (`import axengine`) on the AX650N NPU.

Provider: `AXCLRTExecutionProvider` (M.2 card on a Pi) when the card's device node exists or it is
the only one offered, else `AxEngineExecutionProvider` (on-board), as pyaxengine 0.1.3rc3 orders them.
The device goes in `provider_options=[{"device_id": N}]` (an index into AXCL's card list); the
`(name, dict)` tuple form does not select the device in pyaxengine 0.1.3. The board path ignores it.

What pyaxengine 0.1.3 does that shapes this module (read from its source):
- It prints to stdout: `[INFO] Available providers: ...` at import, then per session
  `[INFO] Using provider`, `SOC Name`, `VNPU type`, `Compiler version` (board: chip type, VNPU
  type, engine version once, model type and compiler version per session). `pyaxengine_output()`
  captures what the calling thread prints; `log_pyaxengine_output()` turns it into one debug line
  per model (`[WARNING]` lines become warnings), so stdout carries only the service's output.
- The AXCL runtime starts (`axclInit`) when the first AXCLRT session is created; `import axengine`
  succeeds even when that will fail. `device_count()` starts it first and reads the card list, so
  a broken runtime or a bad device index is one clear error before any session exists.
- A session that fails half-way raises again from its `__del__` ("Exception ignored in
  AXCLRTSession.__del__"); those teardown errors are logged at debug level instead of printed.
- Only 8/16/32-bit integer, float32 and bf16 tensors load ("Unsupported data type"): an int64
  text encoder input cannot run on the NPU (UnsupportedTensorTypeError).

Threads and contexts. AXCL keeps a current context per thread. Every AXCLRT session calls
`axclrtSetDevice` (making its card's context current on the creating thread), remembers that
context, and makes it current again at each `run()`; so a session may be run from another thread
than the one that created it, and sessions of different cards can be used from one thread. Still,
create each device's sessions on the thread that will run them (its NPU worker): creating a
session points the creating thread at that card, so loading several cards' models on one thread
leaves it on whichever came last and only the restore in `run()` hides that; one thread per card
keeps every thread on its own card. `model_dir.load_models` may run on any thread for this.

Never reload sessions in one process. pyaxengine keeps every AXCLRT session in a module-level
list until the process exits (its `atexit` handler unloads them), so a dropped session is never
freed: loading the models again holds their card memory twice and a later load can fail for lack
of it. To load other models, restart the process.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .pyaxengine_output import contain_teardown_noise, log_pyaxengine_output, pyaxengine_output, release
from .session import FeedError, ModelLoadError, TensorSpec, format_shape_dtype, prepare_feed

log = logging.getLogger(__name__)

AXCLRT_PROVIDER = "AXCLRTExecutionProvider"
AXENGINE_PROVIDER = "AxEngineExecutionProvider"
AXCL_DEVICE_NODE = Path("/dev/axcl_host")  # present when an AXCL (M.2/PCIe) card is attached

INSTALL_HINT = (
    "install the pyaxengine wheel (AXERA-TECH/pyaxengine releases) and make sure the native library "
    "is found: libaxcl_rt.so for the M.2 card (source /etc/profile or add /usr/lib/axcl to "
    "LD_LIBRARY_PATH), libax_engine.so on the board"
)
AXCL_CHECKS = (
    "check that `axcl-smi` lists the card, that the AXCL driver is loaded (reinstall the card's host "
    "package and reboot if `axcl-smi` fails), and that this user can open /dev/axcl_host "
    "(`ls -l /dev/axcl_host`; add the user to its group)"
)
BOARD_CHECKS = (
    "check that libax_engine.so and libax_sys.so are found "
    "(`ldconfig -p | grep -E 'libax_engine|libax_sys'`) and that no other program holds the NPU"
)
READABLE_TYPES = "8/16/32-bit integer, float32 and bfloat16"


class UnsupportedTensorTypeError(ModelLoadError):
    """pyaxengine cannot read one of the model's tensor types (e.g. an int64 input); `reason` is its words."""

    def __init__(self, message: str, path: Path, reason: str):
        super().__init__(message, path)
        self.reason = reason


# --- import, provider, runtime, devices ------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def axengine_import_error() -> str | None:
    """None when `import axengine` works, else why not (cached: the import initialises the runtime)."""
    try:
        with pyaxengine_output() as printed:
            import axengine  # noqa: F401
    except ImportError as exc:  # also raised by pyaxengine when no native provider library is found
        return str(exc) or exc.__class__.__name__
    except OSError as exc:  # a native library that exists but cannot be loaded
        return str(exc)
    finally:
        log_pyaxengine_output("pyaxengine", printed.getvalue())
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


def default_provider() -> str:
    """The provider sessions use on this machine (ModelLoadError when axengine is unavailable)."""
    return choose_provider(list(_import_axengine().get_available_providers()))


def runtime_failure(provider: str, reason: str) -> str:
    """`the AXCL runtime failed to start: pyaxengine says '...'; check ...` (board: the on-board one)."""
    if provider == AXCLRT_PROVIDER:
        return f"the AXCL runtime failed to start: pyaxengine says {reason!r}; {AXCL_CHECKS}"
    return f"the on-board NPU runtime failed to start: pyaxengine says {reason!r}; {BOARD_CHECKS}"


def _start_runtime(provider: str) -> None:
    """Import pyaxengine's provider module, which starts the native runtime (as the first session would)."""
    module = "axengine._axclrt" if provider == AXCLRT_PROVIDER else "axengine._axe"
    contain_teardown_noise()
    try:
        with pyaxengine_output() as printed:
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  RuntimeError from axclInit, OSError/AssertionError: the library
        reason = str(exc) or exc.__class__.__name__
        release(exc)
        raise ModelLoadError(runtime_failure(provider, reason)) from None
    finally:
        log_pyaxengine_output("pyaxengine runtime", printed.getvalue())


def device_count(provider: str | None = None) -> int | None:
    """How many NPUs the provider can use: AXCL's card count, 1 on a board, None when pyaxengine's
    internals are not the 0.1.3 ones. Starts the runtime; ModelLoadError when it cannot start."""
    provider = provider or default_provider()
    _start_runtime(provider)
    if provider == AXENGINE_PROVIDER:
        return 1
    try:  # pyaxengine has no public call for this; its own module reads the same list per session
        capi = importlib.import_module("axengine._axclrt_capi")
        device_list = capi.axclrt_cffi.new("axclrtDeviceList *")
        ret = capi.axclrt_lib.axclrtGetDeviceList(device_list)
        count = int(device_list.num)
    except (ImportError, AttributeError, TypeError, NotImplementedError) as exc:
        log.debug("cannot read AXCL's card list through pyaxengine (%s): the count is unknown", exc)
        return None
    if ret != 0:
        raise ModelLoadError(
            f"the AXCL runtime cannot list the cards (error 0x{ret & 0xFFFFFFFF:08x}); {AXCL_CHECKS}"
        )
    return count


def check_device(index: int) -> str:
    """Check the device index before any session is made; returns e.g. `0 of 1 AXCL card(s)`.

    ModelLoadError naming the index and how many devices were found when it is out of range, and
    when the runtime cannot start or sees no card.
    """
    provider = default_provider()
    count = device_count(provider)
    what = device_noun(provider)
    if count is None:
        return f"{index} (card count unknown)"
    if count == 0:
        raise ModelLoadError(f"no AXCL card found (pyaxengine sees 0 devices); {AXCL_CHECKS}")
    if not 0 <= index < count:
        raise device_index_error(index, count, what)
    return f"{index} of {count} {what}"


def device_noun(provider: str | None = None) -> str:
    """What the provider's devices are called in messages: `AXCL card(s)` or `on-board NPU`."""
    return "AXCL card(s)" if (provider or default_provider()) == AXCLRT_PROVIDER else "on-board NPU"


def device_index_error(index: int, count: int, what: str) -> ModelLoadError:
    """The one wording for a device index beyond the `count` devices axengine sees (count >= 1)."""
    valid = "0" if count == 1 else f"0..{count - 1}"
    return ModelLoadError(
        f"device index {index} is out of range: axengine found {count} {what}; set DEVICE_ID to {valid}"
    )


# --- sessions ------------------------------------------------------------------------------------

_opened: set[tuple[str, int]] = set()
_opened_lock = threading.Lock()


def _note_opened(path: Path, device_id: int, provider: str) -> None:
    """Warn when a model is loaded twice on one card in one process (pyaxengine never frees those)."""
    key = (str(path.resolve()), device_id)
    with _opened_lock:
        again = key in _opened
        _opened.add(key)
    if again and provider == AXCLRT_PROVIDER:
        log.warning(
            "%s is loaded again on device %d: pyaxengine keeps every session until the process exits, "
            "so the card memory of the first load is not freed (restart the process to reload models)",
            path,
            device_id,
        )


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
        contain_teardown_noise()
        with pyaxengine_output() as printed:
            try:
                self._session = axengine.InferenceSession(
                    str(self.path), providers=[self.provider], provider_options=[{"device_id": device_id}]
                )
            except Exception as exc:  # pyaxengine raises RuntimeError/ValueError/AssertionError/OSError
                error = self._load_error(exc)
                release(exc)
                raise error from None
            finally:
                log_pyaxengine_output(f"{self.path.name} on device {device_id}", printed.getvalue())
        _note_opened(self.path, device_id, self.provider)
        self.inputs = [self._spec(arg) for arg in self._session.get_inputs()]
        self.outputs = [self._spec(arg) for arg in self._session.get_outputs()]

    def _load_error(self, exc: Exception) -> ModelLoadError:
        reason = str(exc) or exc.__class__.__name__
        where = f"{self.path}: axengine ({self.provider}, device {self.device_id}) cannot load the model:"
        if "Unsupported data type" in reason:
            return UnsupportedTensorTypeError(
                f"{where} {reason} (pyaxengine reads only {READABLE_TYPES} tensors)", self.path, reason
            )
        if "Failed to initialize" in reason or isinstance(exc, OSError):  # runtime start, not the model
            return ModelLoadError(f"{where} {runtime_failure(self.provider, reason)}", self.path)
        return ModelLoadError(f"{where} {reason}", self.path)

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
