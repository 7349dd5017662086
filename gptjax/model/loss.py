"""Next-token cross-entropy: the plain form, a chunked one that never holds the batch's logits, and
the scorer every figure of a trained model comes from (`token_logprobs`).

The output layer is the model's largest product: for the reference shape (2,048 tokens a step,
a 50,304-word vocabulary) its float32 logits take 412 MB, and autodiff keeps them, their
softmax and their gradient alive at once, each a pass through memory. `chunked_cross_entropy`
walks the batch a few positions of every sequence at a time (about `chunk` tokens): it computes
a chunk's logits, its loss, and at once the gradient with respect to both the chunk's features
and the output matrix, so the backward pass has nothing left to do but scale the saved gradients. Only one chunk of logits exists at
any moment; the softmax's exponentials are taken once (autodiff takes them twice); padded
vocabulary rows are sliced off instead of being masked with -inf.

The arithmetic is the plain form's, the same dtypes in the same places: logits in the compute
dtype, made float32 before the softmax; the logits' gradient cast back to the compute dtype for
the two products. Results differ from the plain form by float32 rounding only, because sums
run in another order (tests/model/test_efficiency.py checks both against each other).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from gptjax.model import products


def cross_entropy(logits_BTV, targets_BT):
    """Mean next-token cross-entropy of full logits, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT).mean()


def _chunks(h_BTD, targets_BT, chunk: int):
    """(C, B, t, D) features, (C, B, t) targets and weights (1/(B·T), 0 on padding): C chunks of t
    positions of every sequence, about `chunk` tokens each. Chunks split time, not the batch, so
    a batch sharded over devices stays sharded the same way in every chunk."""
    B, T, _ = h_BTD.shape
    t = max(1, min(T, chunk // B)) if chunk > 0 else T
    C = -(-T // t)
    pad = C * t - T
    weights_BT = jnp.full((B, T), 1.0 / (B * T), jnp.float32)
    if pad:
        h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT, weights_BT = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets_BT, weights_BT))
    split = lambda a: jnp.moveaxis(a.reshape(B, C, t, *a.shape[2:]), 1, 0)  # noqa: E731
    return split(h_BTD), split(targets_BT), split(weights_BT)


def _chunk_logits(x_BtD, w):
    """The output layer on one chunk: (B·t, V) logits in the compute dtype, then float32. `w` is what
    _head gave: the (V, D) matrix, or in the plain forms its (D, V) copy (accumulated in float32)."""
    x_RD = x_BtD.reshape(-1, x_BtD.shape[-1])
    if products.plain_forms(x_RD.dtype):
        return products.plain_dot(x_RD, w)
    return jnp.dot(x_RD, w.T).astype(jnp.float32)


def _head(w_VD):
    """The output matrix (_real_vocab's) as the chunks' product reads it: itself, or for the plain forms
    (bfloat16 on a CPU with the units: gptjax.model.products) its (D, V) copy, made once for every chunk."""
    return products.plain(w_VD.T) if products.plain_forms(w_VD.dtype) else w_VD


def _chunk_loss(logits_RV, targets_R, weights_R):
    """The chunk's weighted loss sum, and the exponentials and normaliser its gradient needs."""
    max_R = jax.lax.stop_gradient(logits_RV.max(axis=-1))
    shifted_RV = logits_RV - max_R[:, None]
    exp_RV = jnp.exp(shifted_RV)
    sum_R = exp_RV.sum(axis=-1)
    label_R = jnp.take_along_axis(shifted_RV, targets_R[:, None], axis=-1)[:, 0]
    loss = jnp.sum((jnp.log(sum_R) - label_R) * weights_R)
    return loss, exp_RV, sum_R


def _real_vocab(w_VD, vocab_size: int, dtype):
    return w_VD[:vocab_size].astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_cross_entropy(h_BTD, w_VD, targets_BT, vocab_size: int, chunk: int):
    """Mean cross-entropy of the logits h @ w[:vocab_size].T, about `chunk` tokens at a time.

    h_BTD: final features in the compute dtype; w_VD: the (padded) output matrix, float32;
    targets_BT: int token ids below vocab_size. Rows of w past vocab_size are never predicted.
    """
    hs, ts, ws = _chunks(h_BTD, targets_BT, chunk)
    w = _head(_real_vocab(w_VD, vocab_size, h_BTD.dtype))

    def body(total, inputs):
        x_BtD, t_Bt, wt_Bt = inputs
        loss, _, _ = _chunk_loss(_chunk_logits(x_BtD, w), t_Bt.reshape(-1), wt_Bt.reshape(-1))
        return total + loss, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ws))
    return total


def _forward_and_gradients(h_BTD, w_VD, targets_BT, vocab_size: int, chunk: int):
    B, T, D = h_BTD.shape
    dtype = h_BTD.dtype
    hs, ts, ws = _chunks(h_BTD, targets_BT, chunk)
    w = _real_vocab(w_VD, vocab_size, dtype)
    plain = products.plain_forms(dtype)  # both gradients' products in the plain forms, the weight's made (D, V)
    w_head = _head(w)

    def body(carry, inputs):
        total, dw = carry
        x_BtD, t_Bt, wt_Bt = inputs
        x_RD, t_R, wt_R = x_BtD.reshape(-1, D), t_Bt.reshape(-1), wt_Bt.reshape(-1)  # R = B·t rows
        loss, exp_RV, sum_R = _chunk_loss(_chunk_logits(x_RD, w_head), t_R, wt_R)
        # d loss / d logits = (softmax - one_hot(target)) * weight, in float32, then the compute dtype
        probs_RV = exp_RV * (1.0 / sum_R)[:, None]
        onehot_RV = jnp.arange(vocab_size)[None, :] == t_R[:, None]
        dlogits_RV = ((probs_RV - onehot_RV) * wt_R[:, None]).astype(dtype)
        if plain:
            dx_BtD = products.plain_dot(dlogits_RV, w).astype(dtype).reshape(x_BtD.shape)
            dw = dw + products.plain_dot(products.plain(x_RD.T), dlogits_RV)  # (D, V)
        else:
            dx_BtD = jnp.dot(dlogits_RV, w).reshape(x_BtD.shape)
            dw = dw + jnp.dot(dlogits_RV.T, x_RD, preferred_element_type=jnp.float32)
        return (total + loss, dw), dx_BtD

    init = (jnp.zeros((), jnp.float32), jnp.zeros((D, vocab_size) if plain else (vocab_size, D), jnp.float32))
    (total, dw), dxs = jax.lax.scan(body, init, (hs, ts, ws))  # dxs: (C, B, t, D)
    dw_VD = products.transposed(dw) if plain else dw
    dh_BTD = jnp.moveaxis(dxs, 0, 1).reshape(B, -1, D)[:, :T]
    dw_VD = jnp.pad(dw_VD, ((0, w_VD.shape[0] - vocab_size), (0, 0))).astype(w_VD.dtype)
    return total, (dh_BTD, dw_VD)


def _bwd(vocab_size, chunk, grads, g):
    dh_BTD, dw_VD = grads
    return (g * dh_BTD).astype(dh_BTD.dtype), g * dw_VD, None


chunked_cross_entropy.defvjp(_forward_and_gradients, _bwd)  # the gradients are the residuals


def token_logprobs(h_BTD, w_VD, targets_BT, vocab_size: int, chunk: int):
    """log p(target | the positions up to it) at every position (float32, (B, T)) and whether the target was
    the most likely token (bool, (B, T)), about `chunk` tokens at a time (0: all at once).

    The one scorer: validation losses, text and task scores, `logprobs`, bits per byte and the
    benchmarks' figures all come from here, with the arithmetic of the training loss (the same
    chunks and the same output-layer product in the compute dtype, float32 from the logits on).
    """
    B, T, _ = h_BTD.shape
    hs, ts, _ = _chunks(h_BTD, targets_BT, chunk)
    w = _head(_real_vocab(w_VD, vocab_size, h_BTD.dtype))

    def one_chunk(inputs):
        x_BtD, t_Bt = inputs
        logits_RV = _chunk_logits(x_BtD, w)
        top_R = logits_RV.max(axis=-1)  # the log-sum-exp's shift, and the greedy test: one pass, not two
        label_R = jnp.take_along_axis(logits_RV, t_Bt.reshape(-1, 1), axis=-1)[:, 0]
        logz_R = top_R + jnp.log(jnp.sum(jnp.exp(logits_RV - top_R[:, None]), axis=-1))
        return (label_R - logz_R).reshape(t_Bt.shape), (label_R >= top_R).reshape(t_Bt.shape)

    logp_CBt, greedy_CBt = jax.lax.map(one_chunk, (hs, ts))
    unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, -1)[:, :T]  # noqa: E731
    return unchunk(logp_CBt), unchunk(greedy_CBt)
