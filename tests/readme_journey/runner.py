"""The journey's commands, each in `bash -c` from the fresh clone, side by side as their predecessors finish;
run once per test session, the workers of pytest -n sharing it through a lock and a results file."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from xla_flags import xla_flags

BIN = Path(sys.executable).parent  # the environment's bin: its python and its gptjax and lm_eval programs


@dataclass(frozen=True)
class Step:
    """A shell script (README commands, or one of the test's own), run after the steps named in `after`
    succeeded; `env` adds to the journey's environment, or with None removes a variable from it."""

    name: str
    script: str
    after: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)


@dataclass
class Journey:
    root: Path  # the clone, the home folder and the files the steps leave beside the clone
    clone: Path
    results: dict  # step name -> {name, script, rc, stdout, stderr, seconds}, or rc "skipped" and why


def environment(home: Path, cache: dict[str, str]) -> dict[str, str]:
    """A newcomer's shell: the environment's python first on the PATH, a home of its own, one CPU device."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": xla_flags(1), "MPLBACKEND": "Agg", **cache}


def execute(step: Step, clone: Path, env: dict[str, str], timeout: float) -> dict:
    env = {k: v for k, v in {**env, **step.env}.items() if v is not None}
    started = time.monotonic()
    # a session of its own: a step that hangs is stopped with every process it started (a loop's `&` ones too)
    proc = subprocess.Popen(["bash", "-c", step.script], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc, err = "timeout", err + f"\n(stopped after {timeout} s)"
    return {"name": step.name, "script": step.script, "rc": rc, "stdout": out, "stderr": err,
            "seconds": round(time.monotonic() - started, 1)}


def run_steps(steps: list[Step], clone: Path, env: dict[str, str], workers: int, timeout: float) -> dict[str, dict]:
    """Every step, at most `workers` at once, in the list's order of priority, each once its predecessors
    succeeded (a step after a failed one is skipped, saying why); their results by name."""
    results: dict[str, dict] = {}
    waiting = list(steps)
    with ThreadPoolExecutor(workers) as pool:
        running = {}
        while waiting or running:
            for step in list(waiting):
                failed = [d for d in step.after if d in results and results[d]["rc"] != 0]
                if failed:
                    results[step.name] = {"name": step.name, "script": step.script, "rc": "skipped",
                                          "skipped": f"it needs {failed[0]!r}, which failed"}
                    waiting.remove(step)
                elif len(running) < workers and all(d in results for d in step.after):
                    running[pool.submit(execute, step, clone, env, timeout)] = step.name
                    waiting.remove(step)
            if running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    results[running.pop(future)] = future.result()
    return results


def once(shared: Path, run: Callable[[Path], dict]) -> Journey:
    """`run(root)`'s results, computed by the first process of the session to get here (under a lock) and
    read back from a file by the others."""
    root = shared / "readme-journey"
    with open(shared / "readme-journey.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "readme-journey.json"
        if not done.exists():
            started = time.monotonic()
            results = run(root)
            results["(journey)"] = {"seconds": round(time.monotonic() - started, 1)}
            done.write_text(json.dumps(results))
        results = json.loads(done.read_text())
    return Journey(root, root / "clone", results)


def shared_temp(base: Path) -> Path:
    """The session's temporary folder that every pytest -n worker sees (each worker's basetemp is inside it)."""
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
