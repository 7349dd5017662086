"""Never lose work: real kills and signals on train.py, non-finite steps, retention, damaged checkpoints."""

import json
import os
import re
import signal
import subprocess
import sys

import jax.numpy as jnp
import pytest

from conftest import JAX_CACHE_ENV, ROOT, STEPS, losses, run_until, start, tiny_config
from gptjax import data, load
from gptjax.weights.checkpoint import Checkpointer
from gptjax.config import DataConfig
from gptjax.errors import UserError
from gptjax.train.progress import Progress
from gptjax.train.oom import is_out_of_memory, out_of_memory_error
from gptjax.train.trainer import train
from xla_flags import xla_flags


def quiet(_):
    pass


@pytest.mark.slow
def test_kills_and_signals_at_any_moment_resume_exactly(reference, tmp_path):
    """One chain of processes on one run: SIGKILL twice while a checkpoint is written after every step (so
    kills land mid-save too), then SIGTERM and SIGINT with no periodic checkpoint near (each signal's own
    save is the one found), then a resume to the end: the uninterrupted losses, bit for bit."""
    corpus, expected = reference
    run = tmp_path / "run"
    for kill_at in (3, 5):
        out = run_until(start(run, corpus, "--train.resume=true"), kill_at)
        assert "Traceback" not in out
        steps = Checkpointer(run, create=False).all_steps()
        assert steps and max(steps) <= kill_at + 1  # only complete checkpoints are listed
    stopped = max(steps)
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        at = stopped + 1  # the first step this process trains
        proc = start(run, corpus, "--train.ckpt_interval=100", "--train.resume=true")
        out = run_until(proc, at, sig)
        assert proc.returncode == code, out
        assert "Traceback" not in out
        assert f"stopped by {signal.Signals(sig).name}" in out and "--train.resume=true" in out
        assert f"resume: continuing from step {stopped}" in out
        # no periodic checkpoint falls here (ckpt_interval=100): the signal's own save is the one found
        stopped = Checkpointer(run, create=False).latest_step()
        assert stopped is not None and at <= stopped < STEPS, (sig, stopped)
    proc = start(run, corpus, "--train.ckpt_interval=100", "--train.resume=true")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resume: continuing from step {stopped}" in out
    assert losses(run) == expected  # bit for bit, every step


def test_resume_on_an_empty_run_starts_from_scratch(corpus, tmp_path):
    logs = []
    train(tiny_config(tmp_path / "run", corpus, max_steps=2, resume=True), log=logs.append)
    assert any("no checkpoint in" in m and "starting from scratch" in m for m in logs)


def test_nonfinite_step_stops_with_the_last_good_checkpoint(corpus, tmp_path):
    cfg = tiny_config(tmp_path / "run", corpus, lr=1e4, grad_clip=0.0, warmup_steps=0, ckpt_interval=1)
    with pytest.raises(UserError, match=r"step (\d+) was not finite.*last good checkpoint is step (\d+).*"
                                        r"on_nonfinite=skip") as error:
        train(cfg, log=quiet)
    # lr=1e4 overflows within a few steps; which one depends on float32 rounding
    bad, good = map(int, re.search(r"step (\d+) was not.*checkpoint is step (\d+)", str(error.value)).groups())
    assert 2 <= bad <= 6 and good == bad - 1
    assert Checkpointer(tmp_path / "run", create=False).all_steps()[-1] == good


def test_nonfinite_steps_can_be_skipped(corpus, tmp_path):
    cfg = tiny_config(tmp_path / "run", corpus, lr=1e4, grad_clip=0.0, warmup_steps=0, on_nonfinite="skip",
                      max_steps=6)
    logs = []
    history = train(cfg, log=logs.append)
    assert history["skipped"] and any("update was skipped" in m for m in logs)
    params = load(tmp_path / "run").params
    assert all(bool(jnp.isfinite(p).all()) for p in __import__("jax").tree.leaves(params))


def test_retention_keeps_the_latest_and_the_best(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step, val in {1: 5.0, 2: None, 3: 3.0, 4: 4.0, 5: None, 6: 3.5, 7: None}.items():
        ckpt.save(step, {"w": jnp.ones(3)}, {"m": jnp.zeros(3)}, {"step": step, "val_loss": val})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 6, 7]  # the best (3.0) and the two latest


@pytest.mark.slow
def test_damaged_checkpoint_is_named_and_others_still_load(corpus, tmp_path):
    train(tiny_config(tmp_path / "run", corpus, max_steps=6, ckpt_interval=3), log=quiet)
    params_dir = tmp_path / "run" / "checkpoints" / "6" / "params"
    biggest = max((p for p in params_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    with pytest.raises(UserError, match=r"checkpoints/6 cannot be read: it is corrupt.*steps 3"):
        load(tmp_path / "run")
    assert load(tmp_path / "run", step=3).step == 3
    with pytest.raises(UserError, match="cannot be read"):
        train(tiny_config(tmp_path / "run", corpus, max_steps=9, ckpt_interval=3, resume=True), log=quiet)
    env = {"XLA_FLAGS": xla_flags(1), "PATH": "/usr/bin:/bin", **JAX_CACHE_ENV}
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "corrupt" in proc.stderr


def test_each_kind_of_damage_is_named_for_what_it_is(tmp_path, monkeypatch):
    """What orbax raises for each damage, told apart by what is on disk: corrupt only when a file is there and
    cannot be decoded; a missing piece is incomplete; intact arrays of other shapes belong to another model."""
    import shutil

    from gptjax.weights import checkpoint
    from gptjax.weights.checkpoint import read_meta, read_state

    monkeypatch.setattr(checkpoint, "VANISH_GRACE_S", 0.0)  # nothing is being deleted here
    # arrays over orbax's 1 kB inline limit, so that each is stored in files of its own
    params = {"w": jnp.ones((64, 64)), "e": jnp.arange(4096.0).reshape(64, 64), "b": jnp.zeros(64)}
    opt_state = {"m": jnp.full((64, 64), 0.5)}
    ckpt = Checkpointer(tmp_path, keep=10)
    for step in range(1, 9):
        ckpt.save(step, params, opt_state, {"step": step, "val_loss": None})
    ckpt.save(9, params, {}, {"step": 9, "val_loss": None})  # weights only, as convert writes them
    ckpt.close()
    steps = tmp_path / "checkpoints"

    def arrays(step):
        return sorted((p for p in (steps / str(step) / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
                      key=lambda p: -p.stat().st_size)

    (steps / "1" / "_CHECKPOINT_METADATA").unlink()  # orbax's bookkeeping: a read does not need it
    restored, _ = read_state(steps, 1, params)
    assert all(bool((restored[k] == params[k]).all()) for k in params)
    assert read_meta(steps, 1)["step"] == 1

    biggest = arrays(2)[0]
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # OUT_OF_RANGE
    for f in arrays(3):
        f.write_bytes(bytes(b ^ 0x5A for b in f.read_bytes()))  # DATA_LOSS or a zstd failure
    (steps / "4" / "params" / "_METADATA").write_bytes((steps / "4" / "params" / "_METADATA").read_bytes()[:100])
    for step in (2, 3, 4):
        with pytest.raises(UserError, match=rf"checkpoints/{step} cannot be read: it is corrupt") as error:
            read_state(steps, step, params)
        assert "Other checkpoints here: steps 1, " in str(error.value)
    assert "params/_METADATA is not JSON" in str(error.value)

    shutil.rmtree(steps / "5" / "params")
    for f in arrays(6):
        f.unlink()
    (steps / "7" / "meta" / "metadata").unlink()
    for step, call, missing in ((5, read_state, "params/ is missing"), (6, read_state, "a file of it is missing"),
                                (7, read_meta, "meta/metadata is missing")):
        with pytest.raises(UserError, match=rf"checkpoints/{step} cannot be read: it is incomplete, {missing}") as error:
            call(steps, step, params) if call is read_state else call(steps, step)
        assert "corrupt" not in str(error.value)
    (steps / "8" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(UserError, match=r"checkpoints/8 cannot be read: it is corrupt, meta/metadata is not JSON"):
        read_meta(steps, 8)

    other = {"w": jnp.ones((32, 64)), "e": params["e"]}  # sound files, read into another model
    with pytest.raises(UserError, match=r"checkpoints/1 does not match this model: its files are intact.*"
                                        r"w: stored \(64, 64\), this model \(32, 64\); b is stored but not in "
                                        r"this model") as error:
        read_state(steps, 1, other)
    assert "corrupt" not in str(error.value)
    with pytest.raises(UserError, match="checkpoints/9 holds parameters but no optimizer state.*--train.init_from="):
        read_state(steps, 9, params, opt_state)
    assert read_state(steps, 9, params)[0]["e"].sum() == params["e"].sum()


@pytest.mark.parametrize("error", [
    ValueError("Checkpoint path should be absolute. Got out/run/checkpoints/6/params"),  # orbax's, issue 25
    TypeError("restore() got an unexpected keyword argument 'args'"),
    AttributeError("'NoneType' object has no attribute 'items'"),
])
def test_an_error_of_the_call_is_raised_as_it_is_and_not_called_corrupt(task_run, monkeypatch, error):
    """A library refusing the request, or a bug: the original exception with its traceback, and a note naming
    the checkpoint and that its files are not known to be damaged."""
    import orbax.checkpoint as ocp

    from gptjax.inference.sample import main as sample

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.Checkpointer, "restore", refuse)
    with pytest.raises(type(error)) as raised:
        load(task_run.run)
    assert raised.value is error and "corrupt" not in str(raised.value)
    note = " ".join(raised.value.__notes__)
    assert f"reading checkpoint {task_run.run / 'checkpoints' / '6'}" in note and "none is known to be damaged" in note
    with pytest.raises(type(error)):  # the command line lets it through too: a traceback, not a user error
        sample([f"--checkpoint={task_run.run}", "--prompt=a"])


def test_other_readers_and_writers_raise_a_failed_call_as_it_is(tmp_path, monkeypatch):
    """A Hugging Face file that its reader cannot decode is named (a Git LFS placeholder as one); a bug while
    reading one is not. A checkpoint write that fails for another reason than the disk keeps its own cause."""
    import numpy as np

    from gptjax.weights import hf

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1,
                                                             "n_embd": 8, "n_positions": 8, "vocab_size": 64}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="model.safetensors cannot be read"):
        hf.from_hf(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                                       "oid sha256:0123\nsize 548105171\n")
    with pytest.raises(UserError, match=r"model.safetensors is a Git LFS pointer.*git lfs pull"):
        hf.from_hf(tmp_path / "hf")
    bug = AttributeError("'NoneType' object has no attribute 'get'")

    def read_with_a_bug(path):
        raise bug

    monkeypatch.setattr(hf, "_load_file", read_with_a_bug)
    with pytest.raises(AttributeError) as raised:
        hf.from_hf(tmp_path / "hf")
    assert raised.value is bug

    ckpt = Checkpointer(tmp_path / "run")
    cause = KeyError("h/0")

    def refuse(*args, **kwargs):
        raise ValueError("refused") from cause

    monkeypatch.setattr(ckpt.manager, "save", refuse)
    with pytest.raises(ValueError, match="refused") as raised:
        ckpt.save(1, {"w": np.ones(3)}, {}, {"step": 1})
    assert raised.value.__cause__ is cause


def test_resume_with_another_tokenizer_is_refused(corpus, tmp_path):
    train(tiny_config(tmp_path / "run", corpus, max_steps=2), log=quiet)
    cfg = tiny_config(tmp_path / "run", corpus, max_steps=4, resume=True)
    cfg = cfg.__class__(**{**cfg.__dict__, "data": DataConfig(corpus=str(corpus), tokenizer="gpt2")})
    with pytest.raises(UserError, match="data.tokenizer: checkpoint 'byte', now 'gpt2'"):
        train(cfg, log=quiet)


def test_shared_shards_of_another_tokenizer_are_refused(corpus, tmp_path):
    shared = tmp_path / "shards"
    data.prepare(DataConfig(corpus=str(corpus), tokenizer="gpt2"), shared, log=quiet, shared=True)
    before = {p.name: p.stat().st_mtime_ns for p in shared.iterdir()}
    cfg = tiny_config(tmp_path / "run", corpus)
    cfg = cfg.__class__(**{**cfg.__dict__, "data": DataConfig(corpus=str(corpus), tokenizer="byte", dir=str(shared))})
    with pytest.raises(UserError, match="holds token shards of the gpt2 tokenizer, but this run uses byte"):
        train(cfg, log=quiet)
    assert {p.name: p.stat().st_mtime_ns for p in shared.iterdir()} == before


def test_out_of_memory_names_what_would_fit(corpus, tmp_path, monkeypatch):
    from gptjax.train import parallel

    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.")

    monkeypatch.setattr(parallel.Pmap, "train_step", oom)
    with pytest.raises(UserError, match=r"ran out of memory.*--train.batch_size=4 --train.grad_accum=2.*"
                                        r"bfloat16.*fsdp.*block_size"):
        train(tiny_config(tmp_path / "run", corpus), log=quiet)
    assert is_out_of_memory(RuntimeError("CUDA_ERROR_OUT_OF_MEMORY: out of memory"))
    assert not is_out_of_memory(ValueError("shapes do not match"))
    assert "batch_size" not in str(out_of_memory_error(tiny_config(tmp_path, corpus, batch_size=1),
                                                       RuntimeError("Out of memory")))


def test_progress_bar_in_a_terminal_and_lines_in_a_log(capsys):
    bar = Progress(total=10, bar=True)
    bar.step(3, 2.5, 1.25, 1000.0, 7.0, 1e-3, at_interval=False)
    bar.line("step      3 | val loss 2.4000")
    out = capsys.readouterr().out
    assert "\r" in out and "3/10 [#######" in out and "left 0:00:07" in out and "val loss 2.4000" in out
    lines = []
    plain = Progress(total=10, log=lines.append, bar=False)
    plain.step(3, 2.5, 1.25, 1000.0, 7.0, 1e-3, at_interval=False)
    plain.step(4, 2.4, 1.2, 1000.0, 6.0, 1e-3, at_interval=True)
    assert lines == ["step      4 | loss 2.4000 | 1.200 bits/byte | lr 1.00e-03 | 1,000 tok/s | left 0:00:06"]


@pytest.mark.slow
def test_plot_writes_a_png(corpus, tmp_path):
    pytest.importorskip("matplotlib", reason="plotting needs matplotlib")
    for name in ("a", "b"):
        train(tiny_config(tmp_path / name, corpus, max_steps=6, eval_interval=3, log_interval=1), log=quiet)
    env = {**os.environ, "XLA_FLAGS": "", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "gptjax.train.plot", str(tmp_path / "a"), str(tmp_path / "b"),
                           f"--out={tmp_path / 'loss.png'}"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    proc = subprocess.run([sys.executable, "-m", "gptjax.train.plot", str(tmp_path / "missing")], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
