"""The compute dtype that `--model.dtype=auto` stands for on this machine.

bfloat16 (with float32 parameters, softmax and loss) where the device multiplies it faster than
float32: GPUs and TPUs, and CPUs with bfloat16 matrix units (Intel AMX, `amx_bf16`, or AVX-512
BF16, `avx512_bf16`, in /proc/cpuinfo's flags), confirmed there by a short measurement, since a
CPU that has the instructions can still lack the kernels that use them. float32 elsewhere: on a
CPU without the units a bfloat16 product is converted to float32 and runs slower than float32.
The decision is made once per process and said in the run's header.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

BF16_UNITS = ("amx_bf16", "avx512_bf16")
SPEEDUP = 1.3  # what bfloat16 products must gain over float32 on a CPU to be chosen


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def matmul_rate(dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) product in `dtype` (float32 accumulation) on the default device,
    the best of `repeats` after one to compile."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    dot = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    dot(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@functools.cache
def auto_dtype() -> tuple[str, str]:
    """(dtype, why) for this process's default device."""
    import jax
    import jax.numpy as jnp

    backend = jax.default_backend()
    if backend in ("gpu", "tpu"):
        return "bfloat16", f"{backend} with bfloat16 matrix units"
    if backend != "cpu":
        return "float32", f"{backend}: no bfloat16 speed known"
    units = [f for f in BF16_UNITS if f in cpu_flags()]
    if not units:
        return "float32", "this CPU has no bfloat16 matrix units (no amx_bf16 or avx512_bf16 among its flags)"
    ratio = matmul_rate(jnp.bfloat16) / matmul_rate(jnp.float32)
    if ratio >= SPEEDUP:
        return "bfloat16", f"this CPU's {'/'.join(units)}: bfloat16 products measured {ratio:.1f}x float32"
    return "float32", f"this CPU has {'/'.join(units)}, but bfloat16 products measured only {ratio:.1f}x float32"


def resolve(dtype: str) -> str:
    """A concrete compute dtype: `dtype` itself, or what auto stands for here."""
    return auto_dtype()[0] if dtype == "auto" else dtype
