"""What pyaxengine does around its sessions that the service must contain: its prints and the
exceptions its `__del__` raises for a session that failed half-way.

pyaxengine 0.1.3 `print`s `[INFO] ...` lines (providers, SoC, VNPU type, compiler version) for
every session. `pyaxengine_output()` captures what the calling thread prints, leaving other threads'
output alone; `log_pyaxengine_output()` turns it into one debug line per model and logs `[WARNING]`
lines as warnings. Output of the native libraries themselves (C code writing to fd 1) is not captured.
`contain_teardown_noise()` sends "Exception ignored in: <function AXCLRTSession.__del__ ...>" to the
debug log; `release()` drops a caught exception's traceback so the half-built session goes at once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class _ThreadRoutedStdout:
    """Stands in for sys.stdout while captures run: capturing threads write to their own buffer,
    every other thread to the real stream (redirect_stdout alone would swallow other threads' output)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.buffers: dict[int, io.StringIO] = {}

    def write(self, text: str) -> int:
        buffer = self.buffers.get(threading.get_ident())
        if buffer is None and self.target is None:  # no stdout at all: print() drops the text
            return len(text)
        return (buffer if buffer is not None else self.target).write(text)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


_lock = threading.Lock()  # guards sys.stdout and sys.unraisablehook swaps


@contextlib.contextmanager
def pyaxengine_output() -> Iterator[io.StringIO]:
    """Capture what this thread prints (pyaxengine's `print`s) into the yielded buffer."""
    ident = threading.get_ident()
    with _lock:
        router = sys.stdout
        if not isinstance(router, _ThreadRoutedStdout):
            router = sys.stdout = _ThreadRoutedStdout(sys.stdout)
        outer = router.buffers.get(ident)  # nested capture on this thread: share the outer buffer
        buffer = outer if outer is not None else router.buffers.setdefault(ident, io.StringIO())
    try:
        yield buffer
    finally:
        with _lock:
            if outer is None:
                router.buffers.pop(ident, None)
            if not router.buffers and sys.stdout is router:
                sys.stdout = router.target


_PRINTED_FACT = re.compile(r"\[(?P<level>[A-Z]+)\]\s*(?P<key>[^:]+?):\s*(?P<value>.*)")
_SHORT_KEYS = {
    "Using provider": "provider",
    "SOC Name": "SoC",
    "VNPU type": "VNPU",
    "Compiler version": "compiler",
    "Available providers": "available providers",
}


def log_pyaxengine_output(what: str, printed: str) -> None:
    """One debug line `<what>: provider X, SoC Y, compiler Z` from pyaxengine's prints;
    its [WARNING]/[ERROR] lines are logged as warnings."""
    facts = []
    for line in filter(None, (raw.strip() for raw in printed.splitlines())):
        match = _PRINTED_FACT.fullmatch(line)
        if match is None:
            facts.append(line)
        elif match["level"] in ("WARNING", "ERROR"):
            log.warning("%s: pyaxengine: %s: %s", what, match["key"], match["value"])
        else:
            key = match["key"].strip()
            facts.append(f"{_SHORT_KEYS.get(key, key.lower())} {match['value'].strip()}")
    if facts:
        log.debug("%s: %s", what, ", ".join(facts))


# --- teardown noise of failed sessions -------------------------------------------------------------


def _is_pyaxengine_teardown(unraisable: Any) -> bool:
    module = getattr(unraisable.object, "__module__", None) or ""
    return module == "axengine" or module.startswith("axengine.")


def _filtered_hook(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if _is_pyaxengine_teardown(unraisable):
            log.debug(
                "pyaxengine's cleanup of a failed session raised %s: %s (ignored)",
                getattr(unraisable.exc_type, "__name__", unraisable.exc_type),
                unraisable.exc_value,
            )
            return
        previous(unraisable)

    hook.filters_pyaxengine = True  # type: ignore[attr-defined]
    return hook


def contain_teardown_noise() -> None:
    """Route exceptions from pyaxengine's `__del__` to the debug log (the hook wraps the current one)."""
    with _lock:
        if not getattr(sys.unraisablehook, "filters_pyaxengine", False):
            sys.unraisablehook = _filtered_hook(sys.unraisablehook)


def release(exc: BaseException) -> None:
    """Drop the traceback now, so pyaxengine's half-built session is freed while its noise is filtered."""
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
