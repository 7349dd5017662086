"""Settings for training on a CPU, applied by train.py, the training benchmark and python -m gptjax.eval
before JAX starts.

Host memory. XLA's CPU runtime takes every large buffer of a step (activations, logits,
gradients) from the C library's malloc and frees it at the end. glibc serves blocks over 32 MB
with a fresh mmap and returns them with munmap, so every step the kernel maps and zeroes the
same gigabytes again, one 4 KiB page fault at a time: for the reference model (batch 8 x 256
tokens, 50k vocabulary) about 450,000 faults and a second of system time per step, a sixth of
the step's CPU time. Here glibc is told (mallopt) to serve every allocation from its heap, in
one arena, and never to trim that heap: after the first step, a step's buffers are found in
memory the process already owns. Resident memory stays at the run's peak, as it does on an
accelerator.

Scheduling. XLA's CPU compiler orders a step's operations to run independent ones side by side
by default, which keeps many activations alive at once and defeats rematerialisation. The
memory-minimising order measured as fast on the training step (two cores) and needs far less:
GPT-2 124M, batch 4 x 1,024, 15.0 GB of temporaries with the default order, 9.4 GB with this one.

`tune_for_cpu()` applies both when JAX will run on the CPU and its backend has not started yet
(the runtime's threads would keep their own malloc arenas, and XLA_FLAGS are read once). A flag
the user set in XLA_FLAGS is left alone; GPTJAX_CPU_TUNING=off leaves everything as it is.
"""

from __future__ import annotations

import os
import sys

from gptjax.runtime.malloc import M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD, mallopt

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"

applied: list[str] = []  # what tune_for_cpu() set in this process, for reports


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU: its platforms say so, or no accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or ""
    if platforms:
        return {p.strip() for p in platforms.lower().split(",") if p.strip()} <= {"cpu"}
    from importlib.metadata import entry_points
    from importlib.util import find_spec

    plugins = list(entry_points(group="jax_plugins"))
    return not plugins and all(find_spec(name) is None for name in ("jax_plugins", "libtpu"))


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def _reuse_freed_memory() -> bool:
    # one arena for all threads; no mmap for large blocks; never trim the heap (-1 turns trimming off)
    return mallopt((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def tune_for_cpu(reuse_memory: bool = True) -> list[str]:
    """Apply the CPU settings above if they can still take effect; return what was applied.

    `reuse_memory=False` leaves malloc alone: its single arena slows XLA's multi-threaded compiler
    (by about a fifth, measured), which matters to a program that compiles many small steps and
    runs each briefly, and not to a training run.
    """
    if os.environ.get("GPTJAX_CPU_TUNING", "").lower() == "off" or _backend_started() or not _cpu_only():
        return applied
    if reuse_memory and "reused host memory" not in applied and _reuse_freed_memory():
        applied.append("reused host memory")
    flags = os.environ.get("XLA_FLAGS", "")
    if SCHEDULER_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}=false".strip()
    if f"{SCHEDULER_FLAG}=false" in os.environ["XLA_FLAGS"] and "memory-minimising schedule" not in applied:
        applied.append("memory-minimising schedule")
    return applied
