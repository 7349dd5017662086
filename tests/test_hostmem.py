"""The CPU runs' malloc setting: a step's large buffers come back without page faults."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import resource, sys
from gptjax.hostmem import reuse_freed_memory
took = reuse_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (x + 1.0) * 2.0)  # a 64 MiB result, allocated and freed on every call
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print(took, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _probe(**env) -> tuple[bool, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    took, faults = out.stdout.split()
    return took == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_freed_buffers_are_reused_without_page_faults():
    took, faults = _probe()
    system_took, system_faults = _probe(GPTJAX_HOST_MALLOC="system")
    assert took and not system_took
    assert faults < 100, faults
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.exists() and "[always]" in thp.read_text()):
        # 64 MiB is 16,384 pages of 4 KiB: the system malloc maps them anew on every call
        assert system_faults > 4000, system_faults
