"""The modern options and Muon end to end: every layout trains the same model, a stopped run resumes
exactly, checkpoints open with gptjax.load and sample from the KV cache; and bits per byte."""

import dataclasses
import json
import math

import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from gptjax import data, load
from gptjax.config import ModelConfig
from gptjax.errors import UserError
from gptjax.tokenizer import get_tokenizer
from gptjax.train.trainer import train

MODERN = dict(pos_encoding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_head=4, n_kv_head=2,
              tie_embeddings=False, bias=False)


def quiet(_):
    pass


def modern_config(out_dir, corpus, **train_kw):
    cfg = tiny_config(out_dir, corpus, optimizer="muon", muon_lr=0.02, **train_kw)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **MODERN))


def test_modern_model_with_muon_learns_in_every_layout(corpus, tmp_path):
    one = train(modern_config(tmp_path / "one", corpus, devices=1), log=quiet)
    pmap = train(modern_config(tmp_path / "pmap", corpus, devices=4), log=quiet)
    fsdp = train(modern_config(tmp_path / "fsdp", corpus, devices=4, parallel="fsdp"), log=quiet)
    # tensor parallel: heads and feed-forward width over 2 devices, the batch over the other 2
    tp = train(modern_config(tmp_path / "tp", corpus, devices=4, parallel="fsdp", mesh="data:2,model:2"), log=quiet)
    steps = sorted(one["loss"])
    assert one["val_loss"][12] < one["val_loss"][0] - 0.5
    # the same global batch; only the order of float32 sums differs
    for other in (pmap, fsdp, tp):
        np.testing.assert_allclose([other["loss"][s] for s in steps], [one["loss"][s] for s in steps], rtol=2e-5)


def test_modern_run_resumes_exactly_and_samples(corpus, tmp_path):
    whole = train(modern_config(tmp_path / "whole", corpus), log=quiet)
    train(modern_config(tmp_path / "split", corpus), log=quiet, stop_after=6)
    resumed = train(modern_config(tmp_path / "split", corpus, resume=True), log=quiet)
    assert [resumed["loss"][s] for s in range(7, 13)] == [whole["loss"][s] for s in range(7, 13)]  # bit for bit
    model = load(tmp_path / "whole")
    assert model.config.model.pos_encoding == "rope" and model.config.train.optimizer == "muon"
    prompt = "def function_3_4(x):\n"
    greedy = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert len(greedy) > 0 and greedy == "".join(model.stream(prompt, max_new_tokens=20, temperature=0))
    # cached greedy decoding continues exactly as the full forward pass would pick, token by token; the
    # forward pass compiled once, over the whole context padded at the end (causal: the padding after a
    # position changes nothing at it)
    ids = model.tokenizer.encode(prompt)
    T = model.config.model.block_size
    forward = nnx.jit(lambda m, x: m(x))
    for _ in range(5):
        assert len(ids) < T
        logits = np.asarray(forward(model.model, np.array([ids + [0] * (T - len(ids))])))[0, len(ids) - 1]
        ids.append(int(np.argmax(logits)))
    assert model.tokenizer.decode(ids[len(model.tokenizer.encode(prompt)):]) == greedy[:len(
        model.tokenizer.decode(ids[len(model.tokenizer.encode(prompt)):]))]


def test_resuming_with_another_optimizer_is_refused(corpus, tmp_path):
    train(modern_config(tmp_path / "run", corpus, max_steps=2), log=quiet)
    cfg = modern_config(tmp_path / "run", corpus, max_steps=4, resume=True)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="adamw"))
    with pytest.raises(UserError, match="train.optimizer: checkpoint 'muon', now 'adamw'"):
        train(cfg, log=quiet)


def test_bits_per_byte_in_metrics_and_on_a_loaded_model(corpus, tmp_path):
    cfg = tiny_config(tmp_path / "run", corpus, max_steps=6, eval_interval=6)
    h = train(cfg, log=quiet)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    # the validation batches' targets: bytes for the byte tokenizer, but end-of-text covers none
    ds = data.load(cfg.data, tmp_path / "run" / "data", log=quiet)
    tok = get_tokenizer("byte")
    targets = [data.val_batch(ds, 32, cfg.train.seed, i, 8)[1] for i in range(cfg.train.eval_batches)]
    tokens, nbytes = sum(t.size for t in targets), sum(tok.count_bytes(t) for t in targets)
    assert nbytes == sum(int((t != tok.eot_id).sum()) for t in targets)
    for r in val:
        assert r["val_bpb"] == pytest.approx(h["val_bpb"][r["step"]])
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * tokens / nbytes / math.log(2), rel=1e-9)
    assert all("bpb" in r and "elapsed_s" in r for r in records if "loss" in r)
    model = load(tmp_path / "run")
    text = (corpus / "doc003.py").read_text()
    logp = model.logprobs(text, from_start=True)
    assert len(logp) == len(text.encode())  # one byte, one token: every token scored, the first after end-of-text
    assert model.bits_per_byte(text) == pytest.approx(-logp.sum() / len(text.encode()) / math.log(2), rel=1e-6)
    assert len(model.logprobs(text)) == len(text.encode()) - 1


def test_sampling_dtype_and_export_of_a_modern_model(corpus, tmp_path):
    from gptjax.weights.hf import save_hf

    train(modern_config(tmp_path / "run", corpus, max_steps=2), log=quiet)
    f32 = load(tmp_path / "run", dtype="float32")
    bf16 = load(tmp_path / "run", dtype="bfloat16")
    assert bf16.config.model.dtype == "bfloat16" and f32.params["wte"]["embedding"].dtype == np.float32
    assert isinstance(bf16.generate("def ", max_new_tokens=5, temperature=0), str)
    with pytest.raises(UserError, match="trained with --model.pos_encoding=rope.*cannot be exported"):
        save_hf(f32.config, f32.params, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="dtype must be float32, bfloat16 or auto"):
        load(tmp_path / "run", dtype="float16")
    assert ModelConfig(n_head=4, n_kv_head=2).kv_heads == 2
    with pytest.raises(UserError, match="n_kv_head must divide"):
        ModelConfig(n_head=4, n_kv_head=3)
