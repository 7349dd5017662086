"""Paths as a person types them: relative to the working directory, or under ~, wherever one is given.

Orbax refuses relative paths; a reader that handed it one called a sound checkpoint "corrupt" (issue 25).
Every test here runs from a working directory of its own, with HOME pointing at a folder of its own, so a
path that is not expanded or not made absolute at the right place fails, and a literal "~" folder shows.
"""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import JAX_CACHE_ENV, ROOT, make_corpus, tiny_config
from gptjax import load
from xla_flags import xla_flags


@pytest.fixture
def home(task_run, tmp_path, monkeypatch):
    """HOME and the working directory, both holding a copy of the session's trained run ('run', step 6)
    and its task file ('mc.jsonl'); the shared fixture itself is never written to."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    for folder in (home, cwd):
        shutil.copytree(task_run.run / "checkpoints", folder / "run" / "checkpoints")
        shutil.copy(task_run.run / "metrics.jsonl", folder / "run" / "metrics.jsonl")
        shutil.copy(task_run.task, folder / "mc.jsonl")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home


def no_literal_tilde(*folders):
    for folder in folders:
        assert not any(p.name == "~" for p in folder.rglob("*")), f"a folder named ~ under {folder}"


def test_a_run_loads_from_relative_and_home_paths(home, task_run):
    expected = load(task_run.run)
    for path in ("run", "./run", "run/checkpoints", "run/checkpoints/6", "~/run", "~/run/checkpoints/6"):
        model = load(path)
        assert model.step == 6, path
        same = [np.array_equal(a, b) for a, b in zip(_leaves(model.params), _leaves(expected.params))]
        assert same and all(same), path
    assert load("~/run").path == home / "run"  # expanded, and otherwise as given
    assert str(load("run").path) == "run"
    no_literal_tilde(home.parent)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_eval_takes_relative_and_home_paths(home):
    from gptjax.eval.__main__ import main

    results = main(["run", "--task=~/mc.jsonl", "--text=~/mc.jsonl", "--text_field=ctx", "--output=~/figures.json"])
    assert results["step"] == 6 and results["tasks"]["mc"]["examples"] == 5 and results["text"]["documents"] == 5
    assert json.loads((home / "figures.json").read_text())["tasks"]["mc"] == results["tasks"]["mc"]
    again = main(["~/run/checkpoints/6", "--task=mc.jsonl"])["tasks"]["mc"]
    assert again == {**results["tasks"]["mc"], "file": "mc.jsonl"} and results["tasks"]["mc"]["file"] == str(home / "mc.jsonl")
    no_literal_tilde(home.parent)


@pytest.mark.slow
def test_sample_py_with_a_relative_checkpoint_as_the_issue_ran_it(home):
    """The report's own command: sample.py --checkpoint=out/run, relative to where it is run."""
    (home / "prompt.txt").write_text("def ")
    env = {"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           "HOME": str(home), **JAX_CACHE_ENV}
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint=run", "--prompt_file=~/prompt.txt",
                           "--max_new_tokens=4", "--output=~/samples.jsonl"], capture_output=True, text=True,
                          cwd=home, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (home / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["prompt"] == "def " and lines[0]["step"] == 6
    no_literal_tilde(home)


def test_path_options_and_readers_expand_home(home):
    from gptjax.config import Config, DataConfig
    from gptjax.data.shards import shard_folders
    from gptjax.data.sources import corpus_files
    from gptjax.eval.tasks import read_task
    from gptjax.weights.hf import hf_folder
    from gptjax.tokenizer import get_tokenizer

    make_corpus(home / "corpus", n_docs=3)
    for name in ("shards-a", "shards-b"):
        (home / name).mkdir()
    (home / "hf").mkdir()
    (home / "hf" / "config.json").write_text("{}")
    cfg = Config(out_dir="~/runs/one", data=DataConfig(dir="~/shards-a, ~/shards-b"))
    assert cfg.out_dir == str(home / "runs" / "one")
    assert shard_folders(cfg.data.dir) == [home / "shards-a", home / "shards-b"]
    assert shard_folders("~/shards-*") == [home / "shards-a", home / "shards-b"]
    assert Config(out_dir="out/run").out_dir == "out/run"  # relative stays relative: messages show it as given
    assert corpus_files("~/corpus") == sorted((home / "corpus").iterdir())
    assert corpus_files("~/corpus/doc00[01].py") == [home / "corpus" / "doc000.py", home / "corpus" / "doc001.py"]
    assert corpus_files("~/corpus/doc002.py") == [home / "corpus" / "doc002.py"]
    assert read_task("~/mc.jsonl", get_tokenizer("byte"), 32).path == home / "mc.jsonl"
    assert hf_folder("hf:~/hf") == home / "hf"


def test_training_converting_and_plotting_under_home(home, tmp_path):
    """--out_dir, --data.dir, --data.corpus and --train.init_from under ~, then convert and plot there."""
    from gptjax.train import plot
    from gptjax.weights import convert
    from gptjax.train.trainer import train

    make_corpus(home / "corpus", n_docs=8)
    cfg = tiny_config("~/tuned", "~/corpus", max_steps=2, eval_interval=2, ckpt_interval=2, init_from="~/run")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir="~/shards"))
    train(cfg, log=lambda m: None)
    assert (home / "tuned" / "checkpoints" / "2").is_dir() and (home / "shards" / "meta.json").is_file()
    assert (home / "tuned" / "config.toml").is_file() and (home / "tuned" / "metrics.jsonl").is_file()
    convert.main(["to-hf", "~/tuned", "~/hf"])
    assert (home / "hf" / "model.safetensors").is_file()
    convert.main(["from-hf", "~/hf", "~/back"])
    assert load("~/back").step == 0 and load("hf:~/hf").path == home / "hf"
    pytest.importorskip("matplotlib")
    plot.main(["~/tuned", "run", "--out=~/plots/loss.png"])
    assert (home / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    no_literal_tilde(tmp_path)
