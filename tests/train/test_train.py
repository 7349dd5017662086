import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from gptjax import load
from gptjax.weights.checkpoint import Checkpointer
from gptjax.config import ModelConfig, TrainConfig
from gptjax.errors import UserError
from gptjax.model.gpt import GPT
from gptjax.train.optim import learning_rate, make_optimizer
from gptjax.train.step import make_train_step
from gptjax.train.trainer import train


def quiet(_):
    pass


def test_tiny_model_overfits_one_batch():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=257, dtype="float32")
    graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(0)), nnx.Param)
    tx = make_optimizer(TrainConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0, max_steps=300, weight_decay=0.0))
    step = jax.jit(make_train_step(graphdef, tx, 0.0))
    x = jax.random.randint(jax.random.key(1), (1, 4, 33), 0, 256)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    for _ in range(150):
        state, metrics = step(state, x[..., :-1], x[..., 1:], jax.random.key(0))
    assert float(metrics["loss"]) < 0.05


def test_schedule_warms_up_then_decays():
    lr = learning_rate(TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110))
    assert float(lr(0)) == pytest.approx(0.1)
    assert float(lr(9)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55)
    assert float(lr(110)) == pytest.approx(0.1)


def test_training_lowers_validation_loss_and_writes_a_run(corpus, tmp_path):
    cfg = tiny_config(tmp_path / "run", corpus, max_steps=30, eval_interval=15, ckpt_interval=10)
    h = train(cfg, log=quiet)
    assert sorted(h["loss"]) == list(range(1, 31))
    assert h["step_compilations"] == 1  # one pure step, compiled once, through evaluations and saves
    assert h["val_loss"][30] < h["val_loss"][0] - 1.0
    run = tmp_path / "run"
    assert (run / "config.toml").is_file() and (run / "data" / "meta.json").is_file()
    assert Checkpointer(run, create=False).all_steps() == [10, 20, 30]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if "val_loss" in r} == {0, 15, 30}
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in records if "loss" in r)


def test_pmap_on_four_devices_matches_one_device(corpus, tmp_path):
    assert len(jax.local_devices()) == 4
    one = train(tiny_config(tmp_path / "one", corpus, devices=1), log=quiet)
    four = train(tiny_config(tmp_path / "four", corpus, devices=4), log=quiet)
    steps = sorted(one["loss"])
    # the same global batch; only the order of float32 sums differs
    np.testing.assert_allclose([four["loss"][s] for s in steps], [one["loss"][s] for s in steps], rtol=2e-5)


def test_gradient_accumulation_matches_a_larger_batch(corpus, tmp_path):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257, dtype="float32")
    graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(0)), nnx.Param)
    tx = make_optimizer(TrainConfig())
    step = jax.jit(make_train_step(graphdef, tx, 0.0))
    x = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    whole, m1 = step(state, x[None, :, :-1], x[None, :, 1:], jax.random.key(0))
    accum, m2 = step(state, x.reshape(2, 4, 17)[..., :-1], x.reshape(2, 4, 17)[..., 1:], jax.random.key(0))
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
    # Adam's first step is about lr·sign(g): near-zero gradients may differ in the last bits, so
    # the tolerance is a small fraction of the step size (2e-3)
    for a, b in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(accum["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_interrupted_then_resumed_run_matches_uninterrupted(corpus, tmp_path):
    full = train(tiny_config(tmp_path / "full", corpus), log=quiet)
    part = train(tiny_config(tmp_path / "part", corpus), log=quiet, stop_after=5)
    assert sorted(part["loss"]) == [1, 2, 3, 4, 5]
    rest = train(tiny_config(tmp_path / "part", corpus, resume=True), log=quiet)
    assert sorted(rest["loss"]) == list(range(6, 13))
    for s in range(1, 13):
        assert (part["loss"] | rest["loss"])[s] == full["loss"][s], s  # bit for bit on the CPU
    assert rest["val_loss"][12] == full["val_loss"][12]
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(zip(steps, range(len(steps)))))


def test_checkpoint_round_trip(corpus, tmp_path):
    cfg = tiny_config(tmp_path / "run", corpus, max_steps=6)
    train(cfg, log=quiet)
    model = load(tmp_path / "run")
    assert model.step == 6 and model.config.model.vocab_size == 257 and model.tokenizer.name == "byte"
    ckpt = Checkpointer(tmp_path / "run", create=False)
    meta = ckpt.read_meta(6)
    assert meta["tokenizer"] == "byte" and meta["step"] == 6 and meta["config"]["model"]["n_layer"] == 2
    # restoring twice gives identical parameters, also through a specific step's folder
    again = load(tmp_path / "run" / "checkpoints" / "6")
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    # the optimizer state comes back too
    tx = make_optimizer(cfg.train)
    _, opt_state = ckpt.restore(6, model.params, tx.init(model.params))
    assert int(opt_state[1][0].count) == 6


def test_existing_checkpoints_are_never_overwritten(corpus, tmp_path):
    train(tiny_config(tmp_path / "run", corpus, max_steps=6), log=quiet)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*")}
    with pytest.raises(UserError, match="already holds checkpoints.*--train.resume=true"):
        train(tiny_config(tmp_path / "run", corpus, max_steps=6), log=quiet)
    with pytest.raises(UserError, match="model.n_embd: checkpoint 32, now 64"):
        cfg = tiny_config(tmp_path / "run", corpus, max_steps=8, resume=True)
        train(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_embd=64)), log=quiet)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*")}
    assert before == after


def test_resume_without_checkpoint_starts_from_scratch(corpus, tmp_path):
    logs = []
    h = train(tiny_config(tmp_path / "run", corpus, max_steps=3, resume=True), log=logs.append)
    assert any("no checkpoint" in m and "from scratch" in m for m in logs)
    assert sorted(h["loss"]) == [1, 2, 3]


def test_batch_must_split_over_devices(corpus, tmp_path):
    with pytest.raises(UserError, match="does not split evenly over 4 devices; use 8 or 12"):
        train(tiny_config(tmp_path / "run", corpus, batch_size=10), log=quiet)
    assert not (tmp_path / "run").exists()


def test_fine_tune_from_a_run_directory(corpus, tmp_path):
    base = train(tiny_config(tmp_path / "base", corpus, max_steps=6, eval_interval=6), log=quiet)
    cfg = tiny_config(tmp_path / "tuned", corpus, max_steps=4, eval_interval=4, init_from=str(tmp_path / "base"))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_embd=64))  # the source's shape wins
    logs = []
    tuned = train(cfg, log=logs.append)
    assert any("init: weights from" in m for m in logs)
    assert tuned["val_loss"][0] == pytest.approx(base["val_loss"][6], rel=1e-6)
    assert load(tmp_path / "tuned").config.model.n_embd == 32
    # a fine-tune reads its source's tokens, whatever tokenizer the preset names
    from gptjax.train.setup import adopt_source_model

    other = dataclasses.replace(cfg, out_dir=str(tmp_path / "other"), data=dataclasses.replace(cfg.data, tokenizer="gpt2"))
    adopted, source = adopt_source_model(other)
    assert adopted.data.tokenizer == "byte" and source.tokenizer.name == "byte"
