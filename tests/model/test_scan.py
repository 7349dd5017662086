"""--model.scan_layers: the blocks stacked on a layer axis and scanned compute what the per-layer
blocks compute, train alike, and checkpoints move between the two layouts (gptjax.model.stacked).
The 8-device layouts, scanned among them, are in tests/train/test_layouts.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptjax
from conftest import tiny_config
from gptjax.weights import hf
from gptjax.weights.checkpoint import flatten
from gptjax.model.gpt import GPT
from gptjax.model.stacked import relayout
from gptjax.train.trainer import train
from test_model import VARIANTS, build, decode, tokens


def scanned_twin(model):
    """The same weights as `model`, stacked, in a model built with scan_layers."""
    cfg = dataclasses.replace(model.cfg, scan_layers=True)
    graphdef = nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))), nnx.Param)[0]
    return nnx.merge(graphdef, relayout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), True))


def test_relayout_round_trip_and_names():
    model = build(n_layer=3)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stacked = relayout(params, True)
    assert stacked["h"]["attn"]["c_attn"]["kernel"].shape == (3, 32, 96)
    assert "h/attn/c_attn/kernel" in flatten(stacked) and "h/0/attn/c_attn/kernel" in flatten(params)
    back = relayout(stacked, False)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    assert relayout(stacked, True) == stacked  # already so: unchanged


@pytest.mark.parametrize("variant", ["gpt2", "modern"])  # modern: rope, rmsnorm, qk-norm, swiglu, GQA, untied, no bias
def test_scanned_blocks_compute_what_the_loop_computes(variant):
    model = build(**VARIANTS[variant])
    scanned = scanned_twin(model)
    x = tokens(B=2, T=16)
    loss = nnx.jit(lambda m, x, remat: m.loss(x, x, remat=remat), static_argnums=2)
    want = loss(model, x, "none")
    for remat in ("none", "dots"):
        np.testing.assert_allclose(loss(scanned, x, remat), want, rtol=1e-6)
    # the KV cache, stacked as the blocks are: a prefill, then a token
    c1, c2 = model.init_cache(2), scanned.init_cache(2)
    assert c2["layers"]["k"].shape == (2, *c1["layers"][0]["k"].shape)
    for part in (x[:, :5], x[:, 5:6]):
        (a, c1), (b, c2) = decode(model, part, c1), decode(scanned, part, c2)
        np.testing.assert_allclose(b[..., :100], a[..., :100], atol=1e-5)


def test_scanned_training_and_checkpoints_cross_layouts(corpus, tmp_path):
    """The same seed trains the same model in either layout; a scanned run's checkpoint resumes per layer,
    samples and exports to Hugging Face's per-layer names."""
    def config(name, scan, **train_kw):
        cfg = tiny_config(tmp_path / name, corpus, max_steps=6, ckpt_interval=3, eval_interval=3, optimizer="muon",
                          **train_kw)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=scan))

    ref = train(config("loop", False), log=lambda _: None)
    first = train(config("scan", True), log=lambda _: None, stop_after=3)
    resumed = train(config("scan", False, resume=True), log=lambda _: None)  # scanned checkpoint, per-layer run
    got = {**first["loss"], **resumed["loss"]}
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref["loss"][s] for s in range(1, 7)], rtol=1e-6)

    scanned, looped = gptjax.load(tmp_path / "scan", step=3), gptjax.load(tmp_path / "loop", step=3)
    assert scanned.config.model.scan_layers and not looped.config.model.scan_layers
    assert scanned.generate("def ", max_new_tokens=8, temperature=0) == looped.generate("def ", max_new_tokens=8,
                                                                                          temperature=0)
    tensors = hf.hf_tensors(scanned.config.model, scanned.params)
    want = hf.hf_tensors(looped.config.model, looped.params)
    assert sorted(tensors) == sorted(want) and "transformer.h.1.attn.c_attn.weight" in tensors
    for k in want:  # Muon's batched Newton-Schulz on the stacked matrices rounds apart by ~1e-6 in 3 steps
        np.testing.assert_allclose(tensors[k], want[k], atol=1e-5)

