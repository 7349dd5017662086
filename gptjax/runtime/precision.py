"""The compute dtype that `--model.dtype=auto` stands for on this machine.

bfloat16 (with float32 parameters, softmax and loss) where the device multiplies it faster than
float32: GPUs and TPUs, and CPUs with bfloat16 matrix units (Intel AMX, `amx_bf16`, or AVX-512
BF16, `avx512_bf16`, in /proc/cpuinfo's flags), confirmed there by a short measurement, since a
CPU that has the instructions can still lack the kernels that use them. float32 elsewhere: on a
CPU without the units a bfloat16 product is converted to float32 and runs slower than float32.

The decision is made once per process and model shape, by `decide(shape, measure)`: the trainer and
the training bench call it before they build or trace a model, and the run's header says which and
why. On a CPU with the units, `measure()` times the products the model's training step makes, in
the forms it makes them (gptjax.model.products.step_speedup), bfloat16 against float32; a reader
(gptjax.load, sample.py, eval) may first ask while a model's shapes are traced: the measurement then
runs its products outside the trace (ensure_compile_time_eval), so the answer is the same.

What the decision reads can be injected, so that every branch runs on every machine (the tests do):
GPTJAX_HARDWARE="backend=cpu,flags=amx_bf16,speedup=2.0" (any of the three; a missing one is read
from the machine; `flags=` empty for a CPU without the units).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Hashable
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


@functools.cache  # asked at every bfloat16 product a model traces (products.plain_forms)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


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


def backend() -> str:
    """The backend the model runs on: GPTJAX_HARDWARE's backend= where given, else JAX's default."""
    given = injected(os.environ.get(HARDWARE_ENV, ""))
    if "backend" in given:
        return given["backend"]
    import jax

    return jax.default_backend()


def bf16_units() -> list[str]:
    """This CPU's bfloat16 matrix units among BF16_UNITS (GPTJAX_HARDWARE's flags= where given)."""
    given = injected(os.environ.get(HARDWARE_ENV, ""))
    flags = given["flags"] if "flags" in given else cpu_flags()
    return [f for f in BF16_UNITS if f in flags]


def _measured(measure: Callable[[], float] | None) -> float:
    if measure is None:
        raise ValueError("auto's decision on a CPU with bfloat16 units times the model's own products: "
                         "decide() needs the model's shape and its measure")
    import jax

    with jax.ensure_compile_time_eval():  # real products even if a caller is tracing (it should not be)
        return measure()


def _decide(value: str, measure: Callable[[], float] | None) -> Decision:
    given = injected(value)
    note = f" ({HARDWARE_ENV} gave {', '.join(sorted(given))})" if given else ""
    backend_ = backend()
    if backend_ in ("gpu", "tpu"):
        return Decision("bfloat16", f"{backend_} with bfloat16 matrix units{note}")
    if backend_ != "cpu":
        return Decision("float32", f"{backend_}: no bfloat16 speed known{note}")
    units = bf16_units()
    if not units:
        return Decision("float32", f"this CPU has no bfloat16 matrix units (no amx_bf16 or avx512_bf16 among its "
                                   f"flags){note}")
    ratio = given["speedup"] if "speedup" in given else _measured(measure)
    how = "given" if "speedup" in given else "measured"
    if ratio >= SPEEDUP:
        return Decision("bfloat16", f"this CPU's {'/'.join(units)}: the step's products in bfloat16 {how} "
                                    f"{ratio:.2f}x float32{note}")
    return Decision("float32", f"this CPU has {'/'.join(units)}, but the step's products in bfloat16 {how} only "
                               f"{ratio:.2f}x float32 (at least {SPEEDUP}x needed){note}")


# decisions by (GPTJAX_HARDWARE value, model shape); a multi-process run's common ones in _agreed
_decisions: dict[tuple[str, Hashable], Decision] = {}
_agreed: dict[tuple[str, Hashable], Decision] = {}


def decide(shape: Hashable = None, measure: Callable[[], float] | None = None) -> Decision:
    """What auto stands for in this process for a model of `shape` (a key of its products' shapes), decided
    at the first call for that shape (per GPTJAX_HARDWARE value). `measure()`, bfloat16's speed-up over
    float32 on that model's step, runs only where the decision rests on it (a CPU with the units, no
    speedup= given)."""
    key = (os.environ.get(HARDWARE_ENV, ""), shape)
    if key in _agreed:
        return _agreed[key]
    if key not in _decisions:
        _decisions[key] = _decide(key[0], measure)
    return _decisions[key]


def agree(everywhere_bfloat16: bool, shape: Hashable = None, measure: Callable[[], float] | None = None) -> Decision:
    """The processes of one run compute alike: bfloat16 only if every process chose it (each measures its own
    speed-up, and two measurements near the threshold can differ). `everywhere_bfloat16` is what the
    processes found together (distributed.any_process); returns this process's decision after it."""
    mine = decide(shape, measure)
    if mine.dtype == "bfloat16" and not everywhere_bfloat16:
        _agreed[(os.environ.get(HARDWARE_ENV, ""), shape)] = Decision(
            "float32", f"another process of this run found no bfloat16 speed-up; here: {mine.why}")
    return decide(shape, measure)


def resolve(dtype: str, shape: Hashable = None, measure: Callable[[], float] | None = None) -> str:
    """A concrete compute dtype: `dtype` itself, or what auto stands for here for a model of `shape`."""
    return decide(shape, measure).dtype if dtype == "auto" else dtype


def explain(dtype: str, shape: Hashable = None, measure: Callable[[], float] | None = None) -> Decision:
    """The concrete dtype that `dtype` stands for and why, for a header: (bfloat16, 'auto: ...') or
    (float32, 'as set')."""
    if dtype == "auto":
        d = decide(shape, measure)
        return Decision(d.dtype, f"auto: {d.why}")
    return Decision(dtype, "as set")
