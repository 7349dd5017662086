"""Timing helpers the benchmarks and tests share: median wall time, and the time JAX spends compiling."""

from __future__ import annotations

import statistics
import time


def median_time(fn, runs: int) -> float:
    """The median wall time of `runs` calls of fn()."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
BACKEND_COMPILE = COMPILE_EVENTS[-1]  # one per XLA compilation


def compile_durations(fn, events=COMPILE_EVENTS) -> list[float]:
    """Run `fn` once; the seconds of each of JAX's compile-stage `events` that it caused."""
    spent = []

    def listen(event, duration, **_):
        if event in events:
            spent.append(duration)

    import jax

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return spent


def compile_seconds(fn) -> float:
    """Run `fn` once and return the seconds JAX spent tracing, lowering and compiling in it."""
    return sum(compile_durations(fn))


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
