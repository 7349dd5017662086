"""glibc's malloc settings (mallopt), for the programs that tune them: training on a CPU (gptjax.runtime.cpu)
and data preparation (gptjax.data). Elsewhere (other C libraries, other systems) nothing is set."""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8


def mallopt(*settings: tuple[int, int]) -> bool:
    """Apply (parameter, value) pairs; whether all took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries read these numbers differently
        call = libc.mallopt
    except (OSError, AttributeError):
        return False
    call.argtypes, call.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(call(param, value) == 1 for param, value in settings)


def return_large_blocks(threshold: int = 1 << 20) -> bool:
    """Serve blocks of `threshold` bytes and more from mmap, and give them back when freed. By default
    glibc raises its threshold each time such a block is freed, after which megabyte blocks come from
    the heap and fragment it: a process that allocates and frees them all day (a data preparation's
    texts and token arrays) then grows by a few megabytes a minute. A fixed threshold keeps it flat."""
    return mallopt((M_MMAP_THRESHOLD, threshold))
