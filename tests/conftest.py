"""Four simulated CPU devices for every test (set before JAX is imported), and small shared fixtures."""

import os

from xla_flags import xla_flags  # a module without side effects, which explains the flags

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(4)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One XLA compilation cache for the session, fresh and removed at its end: the suite trains the same tiny
# shapes dozens of times, in this process and in the train.py, sample.py and eval processes it starts, and
# compiling them was most of its time (a tiny 2-step run: 12 s compiled, 2 s from the cache). Only XLA's
# compilation is shared; every run still traces its own step (the step_compilations counts are unchanged)
# and runs the executable the compiler made for that very program. The size limit turns on the cache's
# file lock, so that processes reading and writing it at once never see half an entry.
# GPTJAX_TEST_COMPILE_CACHE=off compiles everything afresh, as before.
# The suite's worker processes (pytest -n) inherit the cache of the process that started them.
JAX_CACHE_ENV: dict[str, str] = {}
if os.environ.get("GPTJAX_TEST_COMPILE_CACHE", "on") != "off":
    _cache_dir = os.environ.get("GPTJAX_TEST_CACHE_DIR", "")
    if not (os.environ.get("PYTEST_XDIST_WORKER") and _cache_dir):
        _cache_dir = tempfile.mkdtemp(prefix="gptjax-test-xla-cache-")
        os.environ["GPTJAX_TEST_CACHE_DIR"] = _cache_dir
        atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    JAX_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": _cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1", "JAX_COMPILATION_CACHE_MAX_SIZE": str(16 << 30)}
    os.environ.update(JAX_CACHE_ENV)  # for this process, and the processes that inherit its environment

from gptjax.runtime.cpu import tune_for_cpu  # noqa: E402

# the scheduling setting only: the suite compiles hundreds of small steps, which malloc's single arena
# slows; the tests that start train.py get both settings, as users do (tests/runtime/test_cpu.py checks malloc's)
tune_for_cpu(reuse_memory=False)

import dataclasses  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from gptjax.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_corpus(path: Path, n_docs: int = 40) -> Path:
    """A small corpus of varied, learnable text files."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12)]
        (path / f"doc{i:03d}.py").write_text("".join(lines))
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus")


def tiny_config(out_dir, corpus, **train) -> Config:
    """A model small enough to compile and train in seconds."""
    return Config(
        out_dir=str(out_dir),
        # float32: the tests compare figures to float32 rounding (auto's branches: tests/runtime/test_precision.py)
        model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dtype="float32"),
        data=DataConfig(corpus=str(corpus), tokenizer="byte", val_fraction=0.1),
        train=dataclasses.replace(
            TrainConfig(batch_size=8, max_steps=12, lr=3e-3, warmup_steps=2, eval_interval=6,
                        eval_batches=2, log_interval=3, ckpt_interval=6, sample_tokens=0),
            **train,
        ),
    )


@pytest.fixture(scope="session")
def task_run(tmp_path_factory) -> SimpleNamespace:
    """A tiny model trained 6 steps that scored a multiple-choice task file at each evaluation (steps 0, 3
    and 6), trained once for the evaluation tests: its run directory, corpus, task file and history."""
    from gptjax.train.trainer import train

    root = tmp_path_factory.mktemp("task_run")
    corpus = make_corpus(root / "corpus")
    task = root / "mc.jsonl"
    task.write_text("".join(json.dumps({"ctx": f"_{i}_3(x):\n    return x *", "endings": [" 3", " 7"], "label": 0})
                            + "\n" for i in range(5)))
    history = train(tiny_config(root / "run", corpus, max_steps=6, eval_interval=3, ckpt_interval=6,
                                eval_tasks=str(task)), log=lambda m: None)
    return SimpleNamespace(run=root / "run", corpus=corpus, task=task, history=history)
# ----------------------------------------------------------------------------- train.py as a real process

STEPS = 12  # enough for kills, stops and resumes at several points (24 cost twice the time, checked no more)
ARGS = ["--model.dtype=float32", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--data.tokenizer=byte", "--data.val_fraction=0.1", "--train.batch_size=8", "--train.eval_batches=2",
        "--train.warmup_steps=2", "--train.lr=3e-3", f"--train.max_steps={STEPS}", "--train.eval_interval=8",
        "--train.ckpt_interval=1", "--train.log_interval=1", "--train.sample_tokens=0"]


def start(out_dir, corpus, *extra, args=ARGS, env=None):
    """train.py in a process of its own, on one CPU device, output (stdout and stderr) in a pipe;
    `env` adds to its (otherwise minimal, but for the session's compilation cache) environment."""
    env = {"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", **JAX_CACHE_ENV, **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"--data.corpus={corpus}",
                             f"--out_dir={out_dir}", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env)


def run_until(proc, step: int, sig=signal.SIGKILL) -> str:
    """Read progress until `step` is logged, then send `sig`; the process's whole output."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {step:>6} | loss"):
            proc.send_signal(sig)
            break
    seen.append(proc.stdout.read())
    proc.wait(timeout=120)
    return "".join(seen)


def losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """(corpus, losses by step) of the uninterrupted ARGS run, in the same kind of process as the
    interrupted ones that must reproduce it."""
    root = tmp_path_factory.mktemp("reference")
    corpus = make_corpus(root / "corpus")
    proc = start(root / "ref", corpus)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return corpus, losses(root / "ref")


def pytest_collection_modifyitems(config, items):
    """The tests that start processes of their own (marked slow) first: each takes tens of seconds to
    minutes, and started first they end while the quick ones fill both workers, instead of one long test
    holding the last minutes on its own. The sort is stable, so every worker collects the same order."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
