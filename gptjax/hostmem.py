"""Host memory on a CPU run: keep freed buffers for the next step instead of handing them back.

XLA's CPU runtime takes every large buffer of a step (activations, logits, gradients) from the C
library's malloc and frees it at the end. glibc serves blocks over 32 MB with a fresh mmap and
returns them with munmap, so every step the kernel maps and zeroes the same gigabytes again, one
4 KiB page fault at a time: for the reference model (batch 8 x 256 tokens, 50k vocabulary) about
450,000 faults and a second of system time per step, a sixth of the step's CPU time.

`reuse_freed_memory()` tells glibc (mallopt) to serve every allocation from its heap, in one
arena, and never to trim that heap: after the first step, the step's buffers are found in memory
the process already owns. Resident memory stays at the run's peak, as it does on an accelerator.
It must run before the CPU backend starts (its threads would keep their own arenas), so the
command-line tools call it first. Nothing changes elsewhere: no glibc (macOS, musl), an
accelerator backend, or GPTJAX_HOST_MALLOC=system leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
active = False  # whether reuse_freed_memory() took effect in this process


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU: its platforms say so, or no accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or ""
    if platforms:
        return {p.strip() for p in platforms.lower().split(",") if p.strip()} <= {"cpu"}
    from importlib.metadata import entry_points
    from importlib.util import find_spec

    plugins = list(entry_points(group="jax_plugins"))
    return not plugins and all(find_spec(name) is None for name in ("jax_plugins", "libtpu"))


def reuse_freed_memory() -> bool:
    """Make freed host buffers reusable without page faults; True when the setting took effect."""
    if os.environ.get("GPTJAX_HOST_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():  # too late: the runtime's threads have their arenas
            return False
    if not _cpu_only():
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries read these numbers differently
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # one arena for all threads; no mmap for large blocks; never trim the heap (-1 turns trimming off)
    global active
    active = all(mallopt(param, value) == 1 for param, value in
                 ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
    return active
