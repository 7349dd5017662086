import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.checkpoint import flatten
from gptjax.config import ModelConfig
from gptjax.model import GPT, count_params


def build(**kw):
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 100, **kw})
    return GPT(cfg, nnx.Rngs(0))


def tokens(B=2, T=16, V=100, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def test_shapes_and_names():
    model = build()
    logits = model(tokens())
    assert logits.shape == (2, 16, 128) and logits.dtype == jnp.float32  # vocabulary 100 padded to 128
    names = set(flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    for name in ["wte/embedding", "wpe/embedding", "h/0/ln_1/scale", "h/0/attn/c_attn/kernel",
                 "h/1/attn/c_proj/bias", "h/1/mlp/c_fc/kernel", "h/1/mlp/c_proj/kernel", "ln_f/bias"]:
        assert name in names
    assert nnx.state(model, nnx.Param)["h"][0]["attn"]["c_attn"]["kernel"].shape == (32, 96)  # (in, out)


def test_parameter_count_matches_formula():
    D, L, V, T = 32, 2, 128, 16
    expected = V * D + T * D + L * (12 * D * D + 13 * D) + 2 * D
    assert count_params(nnx.state(build(), nnx.Param)) == expected


def test_initialisation_follows_gpt2():
    model = build(n_layer=4, n_embd=128, n_head=4)
    p = nnx.state(model, nnx.Param)
    assert abs(float(jnp.std(p["wte"]["embedding"])) - 0.02) < 0.002
    assert abs(float(jnp.std(p["h"][0]["attn"]["c_attn"]["kernel"])) - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * 4)
    assert abs(float(jnp.std(p["h"][0]["mlp"]["c_proj"]["kernel"])) - scaled) < 0.001
    assert float(jnp.abs(p["h"][0]["attn"]["c_attn"]["bias"]).max()) == 0.0


def test_padded_vocabulary_is_never_predicted():
    logits = build()(tokens())
    assert bool(jnp.all(jnp.isneginf(logits[..., 100:])))
    assert bool(jnp.all(jnp.isfinite(logits[..., :100])))


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_causality_by_gradients(pos):
    """The output at position t has no gradient from any input embedding after t."""
    model = build(pos_encoding=pos)
    x = tokens(B=1)
    embed = model._embed(x, jnp.arange(16)[None], True, None)

    def out_at(e, t):
        for block in model.h:
            e, _ = block(e)
        return model._logits(e)[0, t, :100].sum()

    for t in (0, 7, 15):
        norms = jnp.abs(jax.grad(out_at)(embed, t)[0]).sum(-1)
        assert float(norms[: t + 1].min()) > 0
        assert float(norms[t + 1:].sum()) == 0.0


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_cached_decoding_matches_full_forward(pos):
    model = build(pos_encoding=pos)
    x = tokens(B=2, T=16)
    full = model(x)
    cache = model.init_cache(2)
    logits, cache = model.decode(x[:, :5], cache)  # prefill 5, then one token at a time
    np.testing.assert_allclose(logits, full[:, :5], atol=1e-5)
    for t in range(5, 16):
        logits, cache = model.decode(x[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
    assert int(cache["index"]) == 16


def test_left_padding_with_mask_matches_unpadded():
    model = build()
    x = tokens(B=1, T=10)
    alone = model(x)[0, -1]
    padded = jnp.concatenate([jnp.zeros((1, 6), jnp.int32), x], axis=1)
    mask = jnp.arange(16)[None] >= 6
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, _ = model.decode(padded, model.init_cache(1), positions_BT=positions, token_mask_BT=mask)
    np.testing.assert_allclose(logits[0, -1], alone, atol=1e-5)


def test_jit_matches_eager():
    model = build()
    x = tokens()
    graphdef, params = nnx.split(model)
    jitted = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)
    np.testing.assert_allclose(jitted, model(x), atol=1e-5)


def test_dropout_only_in_training():
    model = build(dropout=0.5)
    x = tokens()
    np.testing.assert_array_equal(model(x), model(x))
    a = model(x, deterministic=False, rngs=jax.random.key(0))
    b = model(x, deterministic=False, rngs=jax.random.key(1))
    assert not np.allclose(a, b)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = build(dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = model(tokens())
    assert logits.dtype == jnp.float32
    ref = build()(tokens())
    assert float(jnp.abs(logits[..., :100] - ref[..., :100]).max()) < 0.05
