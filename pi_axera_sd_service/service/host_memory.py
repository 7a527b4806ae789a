"""Keep the server's RSS flat without paying for it per image: glibc malloc tuned once per process.

glibc's defaults give each thread its own arena (up to 8 per core) and raise the mmap threshold
after every large free, so image-sized buffers freed on one thread stayed in that thread's arena
and the RSS crept up by tens of MiB. Returning every buffer above 128 KiB to the kernel at once
kept the RSS flat but cost a page fault per 4 KiB each time such a buffer was made again (and a
`malloc_trim` after each request did the same to the rest): ≈25 ms of CPU per image.

The policy (measured in bench/bench_host.py and bench/bench_memory.py):
- one arena for every thread: a request's buffers are reused whichever thread frees them;
- blocks up to MMAP_THRESHOLD_BYTES come from that heap and are reused warm: JSON, prompts,
  tensors of the text encoder and UNet, PNG and base64 strings;
- larger blocks (512x512 images: 0.75 MiB as bytes, 3 MiB as float32; decoded uploads) are
  mapped and returned on free, so a 4000x4000 upload does not stay in the RSS;
- up to TRIM_THRESHOLD_BYTES of free heap is kept above its top, so the next request does not
  fault the heap back in. The RSS grows over the first requests to the working set, then stays.

Call `tune_malloc` before other threads start (`api.server.run_server` does, with LEAN_MEMORY).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1       # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 512 * 1024
TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
ARENA_MAX = 1


def tune_malloc() -> bool:
    """Apply the policy above; False where libc is not glibc (nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_ARENA_MAX, ARENA_MAX), (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    ok = all([bool(mallopt(param, value)) for param, value in settings])
    log.debug("malloc tuned: %d arena, mmap threshold %d B, trim threshold %d B (%s)", ARENA_MAX,
              MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES, ok)
    return ok
