"""The CPU settings: a step's large buffers come back without page faults."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts processes of its own

PROBE = """
import resource, statistics
from gptjax.runtime.cpu import tune_for_cpu
took = "reused host memory" in tune_for_cpu()
import jax, jax.numpy as jnp
# as in a training step, a large temporary (sin(x), 64 MiB) is allocated and freed inside every call
f = jax.jit(lambda x: (jnp.sin(x).T @ x[:, :8]).sum(0))
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, statistics.median(faults[-10:]), faults)  # the heap settles within the first calls
"""


def _probe(**env) -> tuple[bool, float, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    took, faults = out.stdout.split()[:2]
    return took == "True", float(faults), out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_freed_buffers_are_reused_without_page_faults():
    took, faults, out = _probe()
    system_took, system_faults, _ = _probe(GPTJAX_CPU_TUNING="off")
    assert took and not system_took
    assert faults < 100, out
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.exists() and "[always]" in thp.read_text()):
        # 64 MiB is 16,384 pages of 4 KiB: the system malloc maps them anew on every call
        assert system_faults > 4000, system_faults
