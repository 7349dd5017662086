"""Memory per device of the compiled training step, pmap against fsdp, without allocating a model.

    gptjax memory --config=gpt2-1.5b --train.devices=8 [--section.key=value ...]

Both strategies' steps are lowered from shapes alone (jax.eval_shape), compiled for the devices,
and the compiler's own memory analysis is printed per device. On a CPU the devices are simulated
(XLA_FLAGS), so a laptop can size a run for a GPU or TPU host before renting one.
"""

from __future__ import annotations

import os
import sys
import time

from gptjax.config import Config
from gptjax.errors import cli
from gptjax.options import parse_args
from gptjax.runtime.cpu import applied, tune_for_cpu

# JAX and the training layer are imported where the step is compiled: `gptjax memory --help` and a
# mistyped option answer at once, and the device count is asked for before JAX is imported

GB = 1e9


def simulate_cpu_devices(argv: list[str]) -> None:
    """Ask XLA for --train.devices host devices; read when JAX's backend starts, and only by the CPU platform."""
    flags = os.environ.get("XLA_FLAGS", "")
    for arg in argv:
        key, _, n = arg.partition("=")
        if key.lstrip("-").replace("-", "_") == "train.devices" and "device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def state_bytes(strategy, state) -> int:
    """Bytes of parameters and optimizer state that one device holds under `strategy`'s layout."""
    import jax
    import numpy as np

    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(strategy.shardings(state))))


def report(cfg: Config) -> dict:
    """Lower and compile both strategies' steps for `cfg` from shapes alone; per-device bytes and compile seconds."""
    import jax
    import jax.numpy as jnp

    from gptjax.model.gpt import abstract, count_params
    from gptjax.train.optim import make_optimizer
    from gptjax.train.parallel import STRATEGIES, describe, plan_batch, select_devices
    from gptjax.train.setup import resolve

    cfg = resolve(cfg)
    t = cfg.train
    devices = select_devices(t.devices)
    accum, micro = plan_batch(t.batch_size, t.grad_accum, len(devices), jax.process_count())
    graphdef, params = abstract(cfg.model)
    tx = make_optimizer(t)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    x = jax.ShapeDtypeStruct((accum, micro, cfg.model.block_size), jnp.int32)
    out = {"params": count_params(params), "devices": describe(devices), "batch": (accum, micro, cfg.model.block_size),
           "remat": t.remat, "mesh": t.mesh}
    for name, cls in STRATEGIES.items():
        strategy = cls(graphdef, tx, cfg.model.dropout, devices, loss_chunk=t.loss_chunk, remat=t.remat,
                       mesh=t.mesh if name == "fsdp" else "")  # pmap refuses a model axis
        start = time.time()
        mem = strategy.lower(state, x).compile().memory_analysis()
        out[name] = {
            "state": state_bytes(strategy, state),
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
            "aliased": mem.alias_size_in_bytes,  # donated inputs whose buffers the outputs reuse
            "peak": (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                     - mem.alias_size_in_bytes),
            "compile_s": time.time() - start,
        }
    return out


def format_report(r: dict) -> str:
    A, B, T = r["batch"]
    lines = [f"{r['params'] / 1e6:,.1f}M parameters; a step of {A} x {B} x {T} tokens on {r['devices']}; "
             f"remat {r['remat']}" + (f"; fsdp mesh {r['mesh']}" if r['mesh'] else "")
             + (f"; CPU: {', '.join(applied)}" if applied else ""),
             f"{'per device, GB':<44}{'pmap':>10}{'fsdp':>10}{'fsdp/pmap':>11}"]
    rows = [("parameters + optimizer state", "state"), ("compiler: arguments", "arguments"),
            ("compiler: outputs", "outputs"), ("compiler: temporaries", "temporaries"),
            ("compiler: outputs aliasing inputs", "aliased"), ("compiler: args + outputs + temps - aliased", "peak")]
    for label, key in rows:
        p, f = r["pmap"][key], r["fsdp"][key]
        lines.append(f"{label:<44}{p / GB:>10.3f}{f / GB:>10.3f}{(f / p if p else float('nan')):>11.3f}")
    lines.append(f"{'compile time, s':<44}{r['pmap']['compile_s']:>10.1f}{r['fsdp']['compile_s']:>10.1f}")
    return "\n".join(lines)


@cli
def main(argv: list[str]) -> None:
    simulate_cpu_devices(argv)  # before JAX starts its backend
    tune_for_cpu(reuse_memory=False)  # on a CPU, the step compiled with train.py's schedule
    cfg = parse_args(argv, prog="gptjax memory",
                     intro="Memory per device of the compiled training step, pmap against fsdp. "
                           "On a CPU, --train.devices=N simulates N devices.")
    print(format_report(report(cfg)))


if __name__ == "__main__":
    main(sys.argv[1:])
