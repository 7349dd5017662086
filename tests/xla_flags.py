"""XLA flags that the suite's processes share, in a module without side effects (tests/conftest.py sets
the environment on import; tests/layout_worker.py must set its own device count first).

XLA's CPU collectives end the process when a device's thread has not joined an all-reduce within 40 s.
Simulated devices are threads sharing the machine's cores, and the suite runs several 8-device trainings
at once on 2 cores, where a thread can wait longer than that for a core: CI aborted twice so (rendezvous
"Termination timeout ... Expected 8 threads ... only 7 of them arrived"). A patient limit for the tests.
"""

PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                       "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300")

# The suite's models are tiny, so its time is mostly XLA compiling them. Level 0 lowers how hard XLA's CPU
# backend (LLVM) optimises the machine code; the programs XLA builds above it, their fusions and the order of
# their sums, are the same, and every numerical comparison of the suite holds at its tolerance. Measured on a
# 2-core EPYC (Zen 3 class): a tiny 4-step train.py used 25.0 s of CPU at the default level, 15.8 s at 0;
# tests/model/test_model.py, test_scoring.py and tests/inference/test_generate.py took 615 s in all, 252 s.
#
# The second flag has XLA's CPU backend emit its fused loops with its older elemental emitter instead of the
# fusion emitters that lower through MLIR: the same fusions, computed element by element in the same order,
# so the same numbers, from less compiling. Measured on the same machine, one in-process tiny training
# (tests/conftest.py's tiny_config, no compilation cache), three runs each: 17.7 s of CPU and 8.9 s of XLA
# backend compilation with level 0 alone, 14.1 s and 5.2 s with both flags, the final loss bit-identical.
QUICK_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process of the suite: `devices` simulated CPU devices (None: as the process decides,
    e.g. gptjax memory's --train.devices), patient collectives, quick compilation."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
    return f"{count}{PATIENT_COLLECTIVES} {QUICK_COMPILE}"
