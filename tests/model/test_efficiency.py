"""The step's speed and memory techniques compute what the plain forms compute.

The chunked cross-entropy and rematerialisation change how the step is evaluated, never what it
evaluates: losses and gradients agree with the plain forms to float32 rounding, and the compiler's
own memory analysis shows the memory they save (no timing here; benchmarks live in gptjax.bench).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.model.loss import chunked_cross_entropy, cross_entropy
from gptjax.model.attention import attention_implementation
from gptjax.model.gpt import GPT
from gptjax.train.step import make_train_step


def split_model(**kw):
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 100, "dtype": "float32", **kw})
    return nnx.split(GPT(cfg, nnx.Rngs(0)))


def batch(B=3, T=16, V=100, seed=1):
    x = jax.random.randint(jax.random.key(seed), (B, T), 0, V)
    return x, jnp.roll(x, -1, axis=1)


def loss_and_grads(graphdef, params, x, y, **kw):
    f = lambda p: nnx.merge(graphdef, p).loss(x, y, **kw)  # noqa: E731
    return jax.jit(jax.value_and_grad(f))(params)


def max_rel_diff(a_tree, b_tree) -> float:
    return max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
               for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))


@pytest.mark.parametrize("chunk", [1, 7, 16, 48, 4096])  # 48 tokens in all: chunks that do and do not divide
def test_chunked_cross_entropy_matches_the_plain_one(chunk):
    graphdef, params = split_model()  # vocabulary 100 padded to 128: padded rows must get no gradient
    x, y = batch()
    plain_loss, plain_grads = loss_and_grads(graphdef, params, x, y, chunk=0)
    loss, grads = loss_and_grads(graphdef, params, x, y, chunk=chunk)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    assert max_rel_diff(plain_grads, grads) < 1e-5
    assert not np.any(grads["wte"]["embedding"][...][100:])
    # without gradients (evaluation) the loss alone is computed, the same
    eval_loss = jax.jit(lambda p: nnx.merge(graphdef, p).loss(x, y, chunk=chunk))(params)
    np.testing.assert_allclose(eval_loss, plain_loss, rtol=1e-6)


def test_chunked_cross_entropy_on_features_matches_full_logits():
    h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    w = jax.random.normal(jax.random.key(1), (12, 8))
    t = jax.random.randint(jax.random.key(2), (2, 5), 0, 12)
    # jitted: run op by op, the chunks' loop and its custom gradient compile each operation on its own (30 s)
    plain = jax.jit(jax.value_and_grad(lambda h, w: cross_entropy(h @ w.T, t), argnums=(0, 1)))(h, w)
    chunked = jax.jit(jax.value_and_grad(lambda h, w: 3.0 * chunked_cross_entropy(h, w, t, 12, 4), argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(chunked[0], 3.0 * plain[0], rtol=1e-6)
    for a, b in zip(chunked[1], plain[1]):  # the outer factor 3 reaches the saved gradients
        np.testing.assert_allclose(a, 3.0 * b, rtol=1e-5, atol=1e-7)


def test_chunked_cross_entropy_in_bfloat16_is_as_close_to_float32_as_the_plain_one():
    x, y = batch()
    ref_loss, ref_grads = loss_and_grads(*split_model(), x, y, chunk=0)
    graphdef, params = split_model(dtype="bfloat16")
    plain_loss, plain_grads = loss_and_grads(graphdef, params, x, y, chunk=0)
    loss, grads = loss_and_grads(graphdef, params, x, y, chunk=16)
    assert grads["wte"]["embedding"][...].dtype == jnp.float32
    assert abs(loss - ref_loss) <= 1.5 * abs(plain_loss - ref_loss) + 1e-3
    assert max_rel_diff(ref_grads, grads) <= 1.5 * max_rel_diff(ref_grads, plain_grads)


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_rematerialisation_gives_the_same_step(remat):
    graphdef, params = split_model(dropout=0.1)  # dropout: recomputed blocks must draw the same masks
    x, y = batch()
    key = jax.random.key(3)
    plain_loss, plain_grads = loss_and_grads(graphdef, params, x, y, rngs=key, deterministic=False)
    loss, grads = loss_and_grads(graphdef, params, x, y, rngs=key, deterministic=False, remat=remat)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    assert max_rel_diff(plain_grads, grads) < 1e-5


def temp_bytes(**step_options) -> int:
    """The compiled training step's temporary memory, from the compiler's memory analysis."""
    graphdef, params = split_model(n_layer=4, n_embd=64, block_size=64, vocab_size=2000)
    tx = optax.adamw(1e-3)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    x = jnp.zeros((1, 8, 64), jnp.int32)
    step = jax.jit(make_train_step(graphdef, tx, 0.0, **step_options))
    return step.lower(state, x, x, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes


def test_memory_saved_by_chunking_and_rematerialisation():
    plain = temp_bytes(loss_chunk=0)
    logits = 8 * 64 * 2048 * 4  # one float32 copy of the batch's logits
    chunked = temp_bytes(loss_chunk=64)
    assert plain - chunked > logits  # autodiff keeps more than one copy; the chunks keep a 64-row slice
    assert temp_bytes(loss_chunk=64, remat="block") < chunked



def test_attention_uses_cudnn_only_where_it_applies(monkeypatch):
    q = lambda dtype, H=64: jax.ShapeDtypeStruct((2, 8, 4, H), dtype)  # noqa: E731
    assert attention_implementation(q(jnp.bfloat16)) is None  # this is a CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_implementation(q(jnp.bfloat16)) == "cudnn"
    assert attention_implementation(q(jnp.float16, H=128)) == "cudnn"
    for unsupported in (q(jnp.float32), q(jnp.bfloat16, H=12), q(jnp.bfloat16, H=256)):
        assert attention_implementation(unsupported) is None
    monkeypatch.setenv("GPTJAX_ATTENTION", "xla")
    assert attention_implementation(q(jnp.bfloat16)) is None
