"""Many hosts: start JAX's multi-process runtime, one process per host, before any computation.

Where JAX can find the cluster by itself (SLURM, Open MPI, a TPU pod) it does; elsewhere the
processes are started by hand with --dist.coordinator (process 0's host:port),
--dist.num_processes and --dist.process_id. Nothing here is a launcher or a transport of its
own: it only checks the inputs and bounds the wait.

Process 0 speaks for the run: it prints, writes the files beside the checkpoints and holds the run
directory's lock on behalf of every process (sole_writer).

JAX ends a process with a C++ abort and a stack trace when the coordinator cannot be reached in
time; a process that is not 0 therefore first waits until the coordinator accepts connections,
and a watchdog ends any process that is still waiting with a message and exit status 2.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from gptjax.runtime import disk, locks
from gptjax.config import DistConfig
from gptjax.errors import UserError

# JAX's own limit is set past ours, so that our message, not its abort, ends a process that waits too long
JAX_GRACE_S = 30


def detect_cluster() -> str:
    """The name of a multi-process job JAX can read from the environment, or '' for a single process."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ:
        return "SLURM"  # inside srun with several tasks
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return ""


def _wait_for_coordinator(address: str, timeout: float) -> None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        socket.getaddrinfo(host, int(port))
    except socket.gaierror as e:
        raise UserError(f"the coordinator address {address} does not resolve ({e.strerror}); give process 0's "
                        "host name or IP address in --dist.coordinator.") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, timeout)):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"cannot reach the coordinator at {address} within {timeout:g} s. Start process 0 "
                                "(--dist.process_id=0) on that host first, check the address and that the port is "
                                "open between the hosts, or raise --dist.timeout.") from None
            time.sleep(0.2)


@contextmanager
def _watchdog(seconds: float, message: str):
    """Exit with `message` (status 2) if the body is still running after `seconds`."""
    def give_up():
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def initialize(cfg: DistConfig) -> str:
    """Join the other processes if this run is one of several; return how it started ('' for one process)."""
    if jax.distributed.is_initialized():
        return "already started"
    how = "auto" if cfg.coordinator == "auto" else (f"--dist.coordinator={cfg.coordinator}" if cfg.coordinator
                                                       else detect_cluster())
    if not how:
        return ""
    kwargs = {"initialization_timeout": cfg.timeout + JAX_GRACE_S}
    if cfg.num_processes:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    start = time.monotonic()
    if how.startswith("--dist"):
        kwargs["coordinator_address"] = cfg.coordinator
        if cfg.process_id != 0:
            _wait_for_coordinator(cfg.coordinator, cfg.timeout)
        message = (f"process {cfg.process_id} of {cfg.num_processes} reached the coordinator at {cfg.coordinator}, "
                   f"but not all {cfg.num_processes} processes joined within {cfg.timeout} s. Start every process "
                   "with the same --dist.coordinator and --dist.num_processes and its own --dist.process_id "
                   f"(0 to {cfg.num_processes - 1}), or raise --dist.timeout.")
    else:
        job = "cluster" if how == "auto" else how
        message = (f"the processes of this {job} job did not all join within {cfg.timeout} s; check that every "
                   "task runs train.py, or raise --dist.timeout.")
    # CPU devices talk to other processes through gloo (the GPU and TPU runtimes bring their own)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    with _watchdog(max(cfg.timeout - (time.monotonic() - start), 1.0), message):
        try:
            jax.distributed.initialize(**kwargs)
        except (ValueError, RuntimeError) as e:  # e.g. 'auto' on a machine that is no cluster JAX knows
            raise UserError(f"could not start the multi-process runtime ({how}): {str(e).rstrip('.')}. Give "
                            "--dist.coordinator=HOST:PORT (process 0's address), --dist.num_processes and "
                            "--dist.process_id instead.") from None
    return how


def is_primary() -> bool:
    """Process 0 speaks for the run: progress, logs and files beside the checkpoints."""
    return jax.process_index() == 0


def process_0_first(fn: Callable):
    """Run `fn` on process 0, then on the others: they find process 0's files on a shared disk, or
    make their own on a disk of their own, never writing the same file at the same time."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if is_primary() else None
    sync("gptjax: process 0 first")
    return result if is_primary() else fn()


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any; a collective, so every process must call it."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.asarray(flag, np.int32)).any())


def sync(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


@contextmanager
def sole_writer(run_dir: Path, log=print):
    """A run writes its directory alone: process 0 holds the directory's lock (gptjax.runtime.locks) for the
    whole run, on behalf of all the run's processes, and every process of a second run on the same
    directory is refused at once, naming the holder."""
    lock = holder = None
    if is_primary():
        try:
            with disk.writing(run_dir, "the run directory's lock file"):
                lock = locks.acquire(run_dir, "training")
        except locks.Locked as e:
            holder = e.holder
        if lock is not None and lock.unsupported:
            log(f"warning: {run_dir} cannot be locked ({lock.unsupported}: its file system has no flock), so "
                "nothing stops a second trainer from writing into it; start only one")
    if any_process(holder is not None):  # every process of this run stops, not only process 0
        holder = holder or locks.read_holder(run_dir)
        stop_it = f" (or stop it: kill {holder.pid} on {holder.host})" if holder.pid else ""
        raise UserError(f"{run_dir} is in use by another trainer: {holder.describe()}. Two trainers on one run "
                        "directory would write their checkpoints over each other's, so this one stops before "
                        f"touching it; nothing was changed. Wait for that run to end{stop_it} and then resume with "
                        "--train.resume=true, or give another --out_dir.")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()

