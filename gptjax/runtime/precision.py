"""The compute dtype that `--model.dtype=auto` stands for on this machine.

bfloat16 (with float32 parameters, softmax and loss) where the device multiplies it faster than
float32: GPUs and TPUs, and CPUs with bfloat16 matrix units (Intel AMX, `amx_bf16`, or AVX-512
BF16, `avx512_bf16`, in /proc/cpuinfo's flags), confirmed there by a short measurement, since a
CPU that has the instructions can still lack the kernels that use them. float32 elsewhere: on a
CPU without the units a bfloat16 product is converted to float32 and runs slower than float32.

The decision is made once per process, by `decide()`: the trainer and the training bench call it before
they build or trace a model, and the run's header says which and why. A reader (gptjax.load, sample.py,
eval) may first ask while a model's shapes are traced: the measurement then runs its products outside
the trace (ensure_compile_time_eval), so the answer is the same.

What the decision reads can be injected, so that every branch runs on every machine (the tests do):
GPTJAX_HARDWARE="backend=cpu,flags=amx_bf16,speedup=2.0" (any of the three; a missing one is read
from the machine; `flags=` empty for a CPU without the units).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import NamedTuple

from gptjax.errors import UserError

BF16_UNITS = ("amx_bf16", "avx512_bf16")
SPEEDUP = 1.3  # what bfloat16 products must gain over float32 on a CPU to be chosen
HARDWARE_ENV = "GPTJAX_HARDWARE"
_KEYS = ("backend", "flags", "speedup")


class Decision(NamedTuple):
    dtype: str  # "float32" or "bfloat16"
    why: str


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


def injected(value: str) -> dict:
    """GPTJAX_HARDWARE's fields: {"backend": str, "flags": set, "speedup": float}, each only if given."""
    given: dict = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or key not in _KEYS:
            raise UserError(f"{HARDWARE_ENV}={value!r}: {item!r} is not one of {', '.join(k + '=...' for k in _KEYS)} "
                            f"(for example {HARDWARE_ENV}=backend=cpu,flags=amx_bf16,speedup=2.0).")
        if key == "speedup":
            try:
                given[key] = float(text)
            except ValueError:
                raise UserError(f"{HARDWARE_ENV}: speedup={text!r} is not a number (bfloat16 products' rate "
                                "over float32's, such as 2.0).") from None
        else:
            given[key] = set(text.replace("+", " ").split()) if key == "flags" else text.lower()
    return given


def _measured_speedup() -> float:
    import jax
    import jax.numpy as jnp

    with jax.ensure_compile_time_eval():  # real products even if a caller is tracing (it should not be)
        return matmul_rate(jnp.bfloat16) / matmul_rate(jnp.float32)


@functools.cache
def _decide(value: str) -> Decision:
    given = injected(value)
    note = f" ({HARDWARE_ENV} gave {', '.join(sorted(given))})" if given else ""
    if "backend" in given:
        backend = given["backend"]
    else:
        import jax

        backend = jax.default_backend()
    if backend in ("gpu", "tpu"):
        return Decision("bfloat16", f"{backend} with bfloat16 matrix units{note}")
    if backend != "cpu":
        return Decision("float32", f"{backend}: no bfloat16 speed known{note}")
    flags = given["flags"] if "flags" in given else cpu_flags()
    units = [f for f in BF16_UNITS if f in flags]
    if not units:
        return Decision("float32", f"this CPU has no bfloat16 matrix units (no amx_bf16 or avx512_bf16 among its "
                                   f"flags){note}")
    ratio = given["speedup"] if "speedup" in given else _measured_speedup()
    how = "given" if "speedup" in given else "measured"
    if ratio >= SPEEDUP:
        return Decision("bfloat16", f"this CPU's {'/'.join(units)}: bfloat16 products {how} {ratio:.1f}x "
                                    f"float32{note}")
    return Decision("float32", f"this CPU has {'/'.join(units)}, but bfloat16 products {how} only {ratio:.1f}x "
                               f"float32 (at least {SPEEDUP}x needed){note}")


_agreed: dict[str, Decision] = {}  # a multi-process run's common decision, by GPTJAX_HARDWARE value


def decide() -> Decision:
    """What auto stands for in this process, decided at the first call (per GPTJAX_HARDWARE value)."""
    value = os.environ.get(HARDWARE_ENV, "")
    return _agreed.get(value) or _decide(value)


def agree(everywhere_bfloat16: bool) -> Decision:
    """The processes of one run compute alike: bfloat16 only if every process chose it (each measures its own
    speed-up, and two measurements near the threshold can differ). `everywhere_bfloat16` is what the
    processes found together (distributed.any_process); returns this process's decision after it."""
    mine = decide()
    if mine.dtype == "bfloat16" and not everywhere_bfloat16:
        _agreed[os.environ.get(HARDWARE_ENV, "")] = Decision(
            "float32", f"another process of this run found no bfloat16 speed-up; here: {mine.why}")
    return decide()


def auto_dtype() -> tuple[str, str]:
    """(dtype, why) for this process's default device."""
    return tuple(decide())


def resolve(dtype: str) -> str:
    """A concrete compute dtype: `dtype` itself, or what auto stands for here."""
    return decide().dtype if dtype == "auto" else dtype


def explain(dtype: str) -> Decision:
    """The concrete dtype that `dtype` stands for and why, for a header: (bfloat16, 'auto: ...') or
    (float32, 'as set')."""
    if dtype == "auto":
        d = decide()
        return Decision(d.dtype, f"auto: {d.why}")
    return Decision(dtype, "as set")
