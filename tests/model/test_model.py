import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.weights.checkpoint import flatten
from gptjax.config import ModelConfig
from gptjax.model.gpt import GPT, count_params


def build(**kw):
    """A small model; an untied output layer gets random weights (it starts at zero, which would make
    every logit and gradient comparison trivial). Created by compiled code: run op by op, every new
    shape costs each of its hundreds of operations a compilation of its own (seconds per model)."""
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 100, "dtype": "float32", **kw})

    @nnx.jit
    def create():
        model = GPT(cfg, nnx.Rngs(0))
        if not cfg.tie_embeddings:
            model.lm_head.embedding.value = jax.random.normal(jax.random.key(1), model.lm_head.embedding.shape) * 0.02
        return model
    return create()


# the model's two entry points compiled whole (test_jit_matches_eager checks that this changes nothing)
forward = nnx.jit(lambda model, x, **kw: model(x, **kw))
decode = nnx.jit(lambda model, x, cache, **kw: model.decode(x, cache, **kw))


def tokens(B=2, T=16, V=100, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


# GPT-2, its other position encodings, and the modern options alone and together
MODERN = dict(pos_encoding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_head=4, n_kv_head=2,
              tie_embeddings=False, bias=False)
VARIANTS = {"gpt2": {}, "sincos": dict(pos_encoding="sincos"), "rope": dict(pos_encoding="rope"),
            "nope": dict(pos_encoding="none"), "relu2-mqa": dict(mlp="relu2", n_head=4, n_kv_head=1),
            "modern": MODERN}


def test_shapes_and_names():
    model = build()
    logits = forward(model, tokens())
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
    logits = forward(build(), tokens())
    assert bool(jnp.all(jnp.isneginf(logits[..., 100:])))
    assert bool(jnp.all(jnp.isfinite(logits[..., :100])))


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality_by_gradients(variant):
    """The output at position t has no gradient from any input embedding after t."""
    model = build(**VARIANTS[variant])
    x = tokens(B=1)
    positions = jnp.arange(16)[None]
    embed = model._embed(x, positions, True, None)

    def out_at(e, t):
        for block in model.h:
            e, _ = block(e, positions)
        return model._logits(e)[0, t, :100].sum()

    grad = jax.jit(jax.grad(out_at))  # one compilation for every t
    for t in (0, 7, 15):
        norms = jnp.abs(grad(embed, t)[0]).sum(-1)
        assert float(norms[: t + 1].min()) > 0
        assert float(norms[t + 1:].sum()) == 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_matches_full_forward(variant):
    model = build(**VARIANTS[variant])
    x = tokens(B=2, T=16)
    full = forward(model, x)
    cache = model.init_cache(2)
    logits, cache = decode(model, x[:, :5], cache)  # prefill 5, then one token at a time
    np.testing.assert_allclose(logits, full[:, :5], atol=1e-5)
    for t in range(5, 16):
        logits, cache = decode(model, x[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
    assert int(cache["index"]) == 16


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_left_padding_with_mask_matches_unpadded(variant):
    model = build(**VARIANTS[variant])
    x = tokens(B=1, T=10)
    alone = forward(model, x)[0, -1]
    padded = jnp.concatenate([jnp.zeros((1, 6), jnp.int32), x], axis=1)
    mask = jnp.arange(16)[None] >= 6
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, _ = decode(model, padded, model.init_cache(1), positions_BT=positions, token_mask_BT=mask)
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
    logits = forward(model, tokens())
    assert logits.dtype == jnp.float32
    ref = forward(build(), tokens())
    assert float(jnp.abs(logits[..., :100] - ref[..., :100]).max()) < 0.05


def test_modern_options_shapes_and_names():
    model = GPT(ModelConfig(n_layer=2, n_embd=32, block_size=16, vocab_size=100, dtype="float32", **MODERN), nnx.Rngs(0))
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    names = set(flatten(p))
    D, N, K, H, F = 32, 4, 2, 8, 128  # SwiGLU: 8/3 of 4 x 32, rounded up to 64s
    assert p["h"][0]["attn"]["c_attn"]["kernel"].shape == (D, (N + 2 * K) * H)
    assert p["h"][0]["mlp"]["c_fc"]["kernel"].shape == (D, 2 * F) and p["h"][0]["mlp"]["c_proj"]["kernel"].shape == (F, D)
    for name in ["lm_head/embedding", "h/0/attn/q_norm/scale", "h/0/attn/k_norm/scale", "ln_f/scale"]:
        assert name in names
    assert not any(n.endswith("bias") for n in names) and "wpe/embedding" not in names
    assert float(jnp.abs(p["lm_head"]["embedding"]).max()) == 0.0  # an untied head starts at zero
    assert model.init_cache(3)["layers"][0]["k"].shape == (3 * K, 16, H)  # the cache holds key/value heads only
    assert model.cfg.is_gpt2() is False and build().cfg.is_gpt2() is True


def test_rotary_encoding_turns_by_relative_position():
    """With RoPE, a query-key score depends on the distance between the positions only."""
    from gptjax.model.gpt import rotary

    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
    score = lambda a, b: float((rotary(q, jnp.array([[a]]), 10000.0) * rotary(k, jnp.array([[b]]), 10000.0)).sum())  # noqa
    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_auto_dtype_is_a_concrete_choice():
    from gptjax.model.products import decision

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, dtype="auto")
    dtype, why = decision(cfg)
    assert dtype in ("float32", "bfloat16") and why
    assert build(dtype="auto").wte.dtype == jnp.dtype(dtype)
