"""--data.doc_mask and --data.doc_positions in the model (gptjax.model.documents): attention stops at
end-of-text, so a document packed into a window after others computes what it computes alone.

Tolerance: float32 logits of these untrained models are of order 1, where one rounding step is 1.2e-7.
A document alone and inside a packed window goes through the same arithmetic on every row it keeps;
what differs is the shapes (longer rows of masked-out scores, whose exponentials are exactly 0, and
matrix products over more rows), which may change the order of float32 sums inside XLA's kernels.
ATOL = 1e-6 is some eight rounding steps: another document leaking into attention moves these
logits by 1e-3 or more (checked below by the causal model on the same window), a thousand times more."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.config import DataConfig
from gptjax.model import documents
from gptjax.model.documents import Documents
from gptjax.model.gpt import GPT
from test_model import VARIANTS, build, decode, forward

ATOL = 1e-6
EOT = 99  # the last id of build()'s vocabulary of 100, as every tokenizer's end-of-text is its last


def with_docs(model, docs):
    """The same weights as `model` in a model built with the document rule `docs`."""
    graphdef = nnx.split(nnx.eval_shape(lambda: GPT(model.cfg, nnx.Rngs(0), docs)), nnx.Param)[0]
    return nnx.merge(graphdef, nnx.state(model, nnx.Param))


def doc(n, seed):
    """n ids of one document: any ids but end-of-text."""
    return jax.random.randint(jax.random.key(seed), (1, n), 0, EOT)


def test_segments_and_positions_of_a_window():
    x = jnp.array([[5, 6, EOT, 7, EOT, EOT, 8, 9]])
    T = x.shape[1]
    for restart, positions in ((True, [0, 1, 2, 0, 1, 0, 0, 1]), (False, list(range(T)))):
        segment, encoded = documents.window(Documents(EOT, restart), x, jnp.arange(T)[None])
        # the end-of-text token is the last of the document it closes
        assert segment.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
        assert encoded.tolist() == [positions]


def test_the_rule_comes_from_the_data_options():
    assert documents.of_run(DataConfig(), 256) is None
    assert documents.of_run(DataConfig(doc_mask=True), 256) == Documents(256, restart=False)
    assert documents.of_run(DataConfig(doc_mask=True, doc_positions="restart"), 50256) == Documents(50256, True)


@pytest.mark.parametrize("variant", ["gpt2", "sincos", "rope", "modern"])
@pytest.mark.parametrize("restart", [True, False])
def test_a_packed_document_computes_what_it_computes_alone(variant, restart):
    """Doc A, end-of-text, doc B in one window. B's logits equal B's alone: with restart at B's own
    positions 0, 1, ...; with continue, B alone given the positions B has in the window (6, 7, ...).
    A with its end-of-text equals A with its end-of-text alone (both at positions 0, 1, ...)."""
    plain = build(**VARIANTS[variant])
    model = with_docs(plain, Documents(EOT, restart))
    a, b = doc(5, 1), doc(10, 2)
    a_eot = jnp.concatenate([a, jnp.array([[EOT]])], axis=1)
    packed = jnp.concatenate([a_eot, b], axis=1)  # 16 tokens: the whole context
    logits = forward(model, packed)[0, :, :EOT + 1]
    b_positions = None if restart else jnp.arange(6, 16)[None]
    b_alone = forward(model, b, positions_BT=b_positions)[0, :, :EOT + 1]
    np.testing.assert_allclose(logits[6:], b_alone, atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[:6], forward(model, a_eot)[0, :, :EOT + 1], atol=ATOL, rtol=0)
    # the causal model lets B see A: what the mask removes is far above the tolerance
    assert float(jnp.abs(forward(plain, packed)[0, 6:, :EOT + 1] - b_alone).max()) > 1e3 * ATOL


@pytest.mark.parametrize("restart", [True, False])
def test_one_document_is_the_old_model_bit_for_bit(restart):
    """Without docs (doc_mask=false) the model is the causal one it always was; with docs, a window that
    holds no end-of-text is one document and computes exactly that, logits and loss (compiled: run eagerly,
    op by op, the forward compiles each of its hundreds of operations, half a minute of the suite)."""
    plain = build(**VARIANTS["modern"])
    model = with_docs(plain, Documents(EOT, restart))
    x = doc(16, 3)
    want = forward(plain, x)
    assert bool(jnp.array_equal(forward(model, x), want))
    loss = nnx.jit(lambda m, x: m.loss(x, x))
    assert float(loss(model, x)) == float(loss(plain, x))


@pytest.mark.parametrize("variant", ["gpt2", "modern"])  # modern: rope and grouped-query heads
@pytest.mark.parametrize("restart", [True, False])
def test_cached_decoding_keeps_the_documents(variant, restart):
    """A prefill and token-by-token decoding of a window that holds end-of-text tokens give the full
    forward's logits, a left-padded row too: the cache keeps each key's document (1e-5: the cached
    attention's own arithmetic, as tests/model/test_model.py compares it)."""
    model = with_docs(build(**VARIANTS[variant]), Documents(EOT, restart))
    x = doc(16, 4).repeat(2, axis=0)
    x = x.at[0, 4].set(EOT).at[0, 9].set(EOT).at[1, 2].set(EOT)
    full = forward(model, x)
    logits, cache = decode(model, x[:, :7], model.init_cache(2))
    np.testing.assert_allclose(logits[..., :EOT + 1], full[:, :7, :EOT + 1], atol=1e-5)
    for t in range(7, 16):  # end-of-text at 9 comes in one token at a time
        logits, cache = decode(model, x[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0, :EOT + 1], full[:, t, :EOT + 1], atol=1e-5)
    assert cache["docs"]["count"].tolist() == [2, 1]
    padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), x[1:, :11]], axis=1)
    mask = jnp.arange(16)[None] >= 5
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, _ = decode(model, padded, model.init_cache(1), positions_BT=positions, token_mask_BT=mask)
    np.testing.assert_allclose(logits[0, 5:, :EOT + 1], full[1, :11, :EOT + 1], atol=1e-5)


def test_scanned_and_rematerialised_losses_keep_the_documents():
    """The same masked loss per layer and scanned, with each remat policy and the chunked loss."""
    plain = build(**VARIANTS["modern"])
    docs = Documents(EOT, restart=True)
    model = with_docs(plain, docs)
    from test_scan import scanned_twin

    scanned = with_docs(scanned_twin(plain), docs)
    x = doc(16, 5).repeat(2, axis=0).at[0, 6].set(EOT).at[1, 11].set(EOT)
    loss = nnx.jit(lambda m, x, remat, chunk: m.loss(x, x, remat=remat, chunk=chunk), static_argnums=(2, 3))
    want = loss(model, x, "none", 0)
    assert abs(float(want) - float(loss(plain, x, "none", 0))) > 1e-3  # the mask is at work
    for m, remat, chunk in ((model, "block", 8), (scanned, "none", 0), (scanned, "dots", 8)):
        np.testing.assert_allclose(loss(m, x, remat, chunk), want, rtol=1e-6)
    assert dataclasses.replace(scanned.cfg, scan_layers=False) == model.cfg
