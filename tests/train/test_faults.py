"""Faults a long run meets, on real processes: a full disk, a second trainer on the same run directory,
a killed trainer's directory taken over, and a reader loading a run while it checkpoints.

The full disk is a real one where it can be: a tmpfs of a few megabytes, mounted in a user namespace
of its own by `unshare` (no root needed where unprivileged user namespaces are allowed, as on Debian
and most distributions; root can always) and reached from here through /proc/<pid>/root of the
process that holds it. No write is faked: the kernel itself answers ENOSPC. Where no such file system
can be made (Ubuntu 24.04 forbids mounts in unprivileged user namespaces, for one), the train.py test
injects the ENOSPC instead: tests/full_disk_shim.c, preloaded into train.py, refuses writes under the
run directory once a byte budget is spent, as a full disk would, for Python's writes and tensorstore's
alike. The tests that fill a disk from this process (data, metrics, plot, conversion) need the real
one and are skipped, saying why, where it cannot be made. GPTJAX_TEST_FULL_DISK=injected forces the
injected disk, to try that path on a machine that can mount.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ARGS, JAX_CACHE_ENV, ROOT, losses, make_corpus, start
from gptjax import load
from gptjax.weights.checkpoint import CHECKPOINTS, TMP_SUFFIX, CheckpointVanished, list_steps, read_meta
from gptjax.config import DataConfig
from gptjax.data import prepare
from gptjax.errors import UserError
from xla_flags import xla_flags


def quiet(_):
    pass


def _mount_small_disk(mount: Path) -> tuple[subprocess.Popen | None, str]:
    """A real 4 MB tmpfs at `mount`, in a mount namespace held by the returned process; or why not."""
    if os.environ.get("GPTJAX_TEST_FULL_DISK") == "injected":
        return None, "GPTJAX_TEST_FULL_DISK=injected asks for the injected disk"
    if shutil.which("unshare") is None:
        return None, "the unshare command (util-linux) is not installed"
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               f"mount -t tmpfs -o size=4m tmpfs '{mount}' && echo mounted && exec sleep 3600"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "mounted":
        holder.kill()
        return None, f"this machine lets no user namespace mount a file system ({holder.stderr.read().strip()})"
    return holder, ""


class SmallDisk:
    """A disk of a few megabytes to fill: `path` is on it, `fill(leave)` leaves about that many bytes
    free, `env` is what a train.py process needs to see it full, `free()` gives the space back."""

    def __init__(self, path: Path, shim: Path | None = None):
        self.path, self.shim, self.env, self.ballast = path, shim, {}, path / "ballast"
        self.real = shim is None

    def fill(self, leave: int) -> None:
        if self.real:
            st = os.statvfs(self.path)
            with open(self.ballast, "wb") as f:
                f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
        else:
            self.env = {"LD_PRELOAD": str(self.shim), "FULL_DISK_DIR": str(self.path.resolve()),
                        "FULL_DISK_BYTES": str(leave)}

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)
        self.env = {}


@pytest.fixture
def disk_or_injected(tmp_path):
    """The small real disk, or where none can be made, a folder that the preloaded shim fills."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    holder, why_not = _mount_small_disk(mount)
    if holder is not None:
        yield SmallDisk(Path(f"/proc/{holder.pid}/root") / mount.relative_to("/"))
        holder.kill()
        holder.wait()
        return
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip(f"no full disk: no small file system ({why_not}) and no C compiler to build the shim")
    shim = tmp_path / "full_disk_shim.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(shim), str(ROOT / "tests" / "full_disk_shim.c"),
                    "-ldl"], check=True)
    yield SmallDisk(mount, shim)


@pytest.fixture
def small_disk(tmp_path):
    """The real small disk, as a path this process and its children can write to."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    holder, why_not = _mount_small_disk(mount)
    if holder is None:
        pytest.skip(f"no small file system: {why_not}")
    yield Path(f"/proc/{holder.pid}/root") / mount.relative_to("/")
    holder.kill()
    holder.wait()


def fill(disk: Path, leave: int) -> Path:
    """Write a ballast file that leaves about `leave` bytes free on `disk`."""
    st = os.statvfs(disk)
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return ballast


@pytest.mark.slow
def test_a_full_disk_stops_training_cleanly_and_resumes_exactly(reference, disk_or_injected, tmp_path):
    corpus, expected = reference
    disk = disk_or_injected
    # Only the checkpoints live on the small disk (checkpoints/ a link to it, as one would put them on
    # a disk of their own), so that a checkpoint save is what meets the full disk. With the whole run
    # there, the metrics line or TensorBoard's events can be the first write refused, whichever comes
    # first; test_metrics_plot_and_conversion_on_a_full_disk covers those.
    run = tmp_path / "run"
    run.mkdir()
    (disk.path / CHECKPOINTS).mkdir()
    (run / CHECKPOINTS).symlink_to(disk.path / CHECKPOINTS)
    disk.fill(leave=1_000_000)  # two checkpoints (~440 kB each) fit, the third does not
    proc = start(run, corpus, "--train.resume=true", env=disk.env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "ran out of memory" not in out  # one message, and not about the device
    warning = out.index("warning: ")
    assert "4 checkpoints of this model (--train.keep_checkpoints=3" in out and warning < out.index("step      0")
    message = out[out.index("error: "):]
    assert "error: the disk is full: writing the checkpoint of step" in message
    assert re.search(rf"to {re.escape(str(run / CHECKPOINTS))} needs about [\d.]+ (kB|MB), and [\d.,]+ (bytes|kB|MB) is "
                     r"free there \(No space left on device\)", message), message
    assert "--train.resume=true" in message
    failed = int(message.split("checkpoint of step ")[1].split()[0])
    intact = list_steps(run / CHECKPOINTS)
    assert intact and max(intact) == failed - 1
    assert not list((run / CHECKPOINTS).glob(f"*{TMP_SUFFIX}"))  # the partial checkpoint is gone
    for step in intact:
        assert load(run, step=step).step == step

    disk.free()  # space freed: the same command continues as if nothing had happened
    proc = start(run, corpus, "--train.resume=true", env=disk.env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resume: continuing from step {failed - 1}" in out
    assert losses(run) == expected  # bit for bit, every step


@pytest.mark.slow
def test_a_full_disk_while_preparing_data_keeps_the_work_done(small_disk, tmp_path, monkeypatch):
    from gptjax.data import pipeline

    monkeypatch.setattr(pipeline, "COMMIT_SECONDS", 0)  # record progress after every chunk, not every 2 s
    corpus = make_corpus(tmp_path / "corpus", n_docs=400)  # about 170 kB of text: 340 kB of byte tokens
    cfg = DataConfig(corpus=str(corpus), tokenizer="byte", val_fraction=0.1)
    ballast = fill(small_disk, leave=200_000)
    folder = small_disk / "data"
    with pytest.raises(UserError) as error:
        prepare(cfg, folder, log=quiet, chunk_chars=20_000)
    message = str(error.value)
    assert message.startswith(f"the disk is full: writing the token shards to {folder} needs about ")
    assert re.search(r"needs about [\d.]+ kB, and [\d.,]+ (bytes|kB) is free there", message), message
    assert re.search(r"The [\d,]+ tokens written before are kept, and the preparation continues from them", message)
    assert not list(folder.glob("*.tmp")) and not (folder / "meta.json").exists()
    ballast.unlink()
    logs = []
    ds = prepare(cfg, folder, log=logs.append, chunk_chars=20_000)
    assert any("resuming the preparation" in m for m in logs)
    ref = prepare(cfg, tmp_path / "ref", log=quiet, chunk_chars=20_000)  # as if the disk had never filled
    assert ds.meta == ref.meta
    assert all((folder / f).read_bytes() == (tmp_path / "ref" / f).read_bytes() for f in ("train.bin", "val.bin"))


@pytest.mark.slow
def test_metrics_plot_and_conversion_on_a_full_disk(small_disk, tmp_path):
    from gptjax.train import plot
    from gptjax.weights import hf
    from gptjax.config import Config, ModelConfig
    from gptjax.weights.hf import abstract_params
    from gptjax.train.logs import MetricsLog

    run = small_disk / "run"
    run.mkdir()
    log = MetricsLog(run, None)
    log.write({"step": 1, "tokens": 256, "loss": 3.0})
    ballast = fill(small_disk, leave=0)
    # the log's own lines, or the TensorBoard events beside them when tensorboardX is installed
    with pytest.raises(UserError, match=r"the disk is full: writing the (metrics log to \S+metrics.jsonl needs about "
                                        r"\d+ bytes, and|TensorBoard events to \S+tensorboard failed:) 0 bytes is free"):
        for step in range(2, 2000):  # a page's slack may take a few lines first
            log.write({"step": step, "tokens": 256 * step, "loss": 3.0})
    assert all(line.startswith('{"step"') and line.endswith("}") for line in
               (run / "metrics.jsonl").read_text().splitlines())  # whole lines only
    pytest.importorskip("matplotlib")
    with pytest.raises(UserError, match=r"writing the plot to .*loss.png needs about [\d.]+ kB, and 0 bytes"):
        plot.plot([run], run / "loss.png")
    assert not (run / "loss.png").exists()
    pytest.importorskip("safetensors")
    import jax
    import jax.numpy as jnp

    config = Config(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), abstract_params(config.model))
    with pytest.raises(UserError, match=r"writing the converted model to .*hf needs about [\d.]+ (kB|MB), and 0 bytes"):
        hf.save_hf(config, params, small_disk / "hf")
    assert not (small_disk / "hf").exists()
    ballast.unlink()  # so that tensorboardX's own last flush, at exit, finds room


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_ones_run_is_taken_over(reference, tmp_path):
    corpus, expected = reference
    run = tmp_path / "run"
    first = start(run, corpus)
    for line in first.stdout:  # until the first trainer has written a checkpoint, then freeze it there
        if line.startswith("step ") and "| loss" in line and list_steps(run / CHECKPOINTS):
            first.send_signal(signal.SIGSTOP)
            break
    before = sorted(p.name for p in (run / CHECKPOINTS).iterdir())
    started = time.monotonic()
    second = start(run, corpus, "--train.resume=true")
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out
    assert "Traceback" not in out and time.monotonic() - started < 60  # refused, not left waiting
    assert f"is in use by another trainer: process {first.pid} on host {socket.gethostname()}, started " in out
    assert f"kill {first.pid}" in out and "nothing was changed" in out
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == before

    first.kill()  # SIGKILL: the kernel lets go of its lock, and nothing else is left to clean up
    first.wait(timeout=60)
    third = start(run, corpus, "--train.resume=true")
    out, _ = third.communicate(timeout=300)
    assert third.returncode == 0, out
    assert "resume: continuing from step" in out and not (run / ".lock").exists()
    assert not list((run / CHECKPOINTS).glob(f"*{TMP_SUFFIX}"))  # what the killed save left is gone
    assert losses(run) == expected


@pytest.mark.slow
def test_a_run_is_read_a_hundred_times_while_it_checkpoints_every_step(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith(("--train.max_steps", "--train.log_interval",
                                                 "--train.eval_interval"))]
    trainer = start(run, corpus, "--train.max_steps=100000", "--train.keep_checkpoints=2",
                    "--train.log_interval=1000", "--train.eval_interval=100000", args=args)
    try:
        while not list_steps(run / CHECKPOINTS):
            assert trainer.poll() is None, trainer.stdout.read()
            time.sleep(0.1)
        env = {"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
               **JAX_CACHE_ENV}
        sampler = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={run}", "--prompt=def ",
                                    "--max_new_tokens=4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=ROOT, env=env)
        steps = []
        while len(steps) < 100:  # each races the trainer's saves and retention's deletions
            steps.append(load(run).step)  # any exception fails the test
        assert trainer.poll() is None  # every load raced a live run
        out, err = sampler.communicate(timeout=300)
        assert sampler.returncode == 0 and out.startswith("def ") and not err, err
    finally:
        trainer.kill()
        trainer.wait()
    assert steps == sorted(steps)  # always the newest: never an older one after a newer
    assert steps[-1] - steps[0] >= 15, steps  # and the run moved on under the reader


def test_a_failed_read_leaves_no_traceback_behind(monkeypatch):
    """A read that fails (a checkpoint deleted under it, or damaged) closes orbax's event loop while some of
    tensorstore's reads are still in flight; each, finishing later, posts to the closed loop, and the
    RuntimeError it raises reaches sys.unraisablehook from tensorstore's thread. From a failed read on, those
    reports, and only those, are dropped: the reader's output holds its message alone."""
    import asyncio
    import types

    from gptjax import errors
    from gptjax.weights import checkpoint

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(errors, "_noise", [])
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:  # as tensorstore's thread calls it: the traceback starts in asyncio
        late = types.SimpleNamespace(exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__.tb_next,
                                     err_msg=None, object=None)
    other = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                                  exc_traceback=None, err_msg=None, object=None)
    namespace = {}  # a coroutine function of orbax's, as its file names it
    exec(compile("async def read():\n    pass\n", os.path.join(os.sep, "site", "orbax", "checkpoint", "x.py"),
                 "exec"), namespace)
    unresumed = namespace["read"]()  # a read's coroutine, never run

    async def ours():
        pass

    mine = ours()
    closed, closed_ours = (types.SimpleNamespace(exc_type=GeneratorExit, exc_value=GeneratorExit(), exc_traceback=None,
                                                 err_msg=None, object=c) for c in (unresumed, mine))
    raised = Exception("Encountered error while reading array index")  # as orbax raises it from the close
    raised.__cause__ = GeneratorExit()
    raised_on_close = types.SimpleNamespace(exc_type=Exception, exc_value=raised, exc_traceback=None, err_msg=None,
                                            object=unresumed)
    try:
        sys.unraisablehook(late)
        assert seen == [late]  # nothing is dropped before a read failed
        with pytest.raises(UserError, match="cannot be read|vanished|does not exist|no checkpoint"):
            checkpoint.read_meta(Path("/nonexistent-gptjax") / CHECKPOINTS, 3)
        for report in (late, closed, raised_on_close, other, closed_ours):
            sys.unraisablehook(report)
        # the same words raised anywhere else, and a coroutine of another library, still reach the hook
        assert seen == [late, other, closed_ours]
    finally:
        unresumed.close()
        mine.close()


def test_the_next_newest_is_read_when_the_chosen_one_is_deleted_under_the_reader(tmp_path, monkeypatch):
    """The race of the test above, made certain: retention deletes the checkpoint that load() chose
    after it chose it and before it read the parameters."""
    from conftest import tiny_config
    from gptjax.weights import sources
    from gptjax.weights.checkpoint import Checkpointer
    from gptjax.options import to_dict
    from gptjax.train.setup import init_model, resolve

    run = tmp_path / "run"
    cfg = resolve(tiny_config(run, tmp_path / "corpus"))
    params = init_model(cfg)[1]
    ckpt = Checkpointer(run, keep=5)
    for step in (1, 2, 3, 4):  # as a run writes them, without its optimizer state
        ckpt.save(step, params, {}, {"step": step, "config": to_dict(cfg), "tokenizer": "byte", "val_loss": None})
    ckpt.close()
    real_read_state, deleted = sources.read_state, []

    def read_state_after_retention(ckpt_dir, step, *args):
        if not deleted:
            shutil.rmtree(ckpt_dir / str(step))  # as orbax's retention does: the files, then the folder
            deleted.append(step)
        return real_read_state(ckpt_dir, step, *args)

    monkeypatch.setattr(sources, "read_state", read_state_after_retention)
    assert load(run).step == 3 and deleted == [4]
    with pytest.raises(CheckpointVanished, match="checkpoints/3 vanished while it was being read"):
        deleted.clear()
        load(run, step=3)  # a step asked for by number: no other will do


def test_a_vanished_checkpoint_is_not_called_corrupt(tmp_path):
    import jax.numpy as jnp

    from gptjax.weights.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, keep=5)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.ones(3)}, {"m": jnp.zeros(3)}, {"step": step, "val_loss": None})
    ckpt.close()
    shutil.rmtree(tmp_path / CHECKPOINTS / "2")
    with pytest.raises(CheckpointVanished, match=r"checkpoints/2 vanished while it was being read.*Steps there now: "
                                                 r"1, 3") as error:
        read_meta(tmp_path / CHECKPOINTS, 2)
    assert "corrupt" not in str(error.value)
    (tmp_path / CHECKPOINTS / "3" / "meta" / "metadata").write_text("{not json")  # there, and damaged
    with pytest.raises(UserError, match=r"checkpoints/3 cannot be read: it is corrupt"):
        read_meta(tmp_path / CHECKPOINTS, 3)
