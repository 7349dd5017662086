"""Next-token cross-entropy: the plain form, and a chunked one that never holds the batch's logits.

The output layer is the model's largest product: for the reference shape (2,048 tokens a step,
a 50,304-word vocabulary) its float32 logits take 412 MB, and autodiff keeps them, their
softmax and their gradient alive at once, each a pass through memory. `chunked_cross_entropy`
walks the tokens `chunk` rows at a time: it computes a chunk's logits, its loss, and at once
the gradient with respect to both the chunk's features and the output matrix, so the backward
pass has nothing left to do but scale the saved gradients. Only one chunk of logits exists at
any moment; the softmax's exponentials are taken once (autodiff takes them twice); padded
vocabulary rows are sliced off instead of being masked with -inf.

The arithmetic is the plain form's, the same dtypes in the same places: logits in the compute
dtype, made float32 before the softmax; the logits' gradient cast back to the compute dtype for
the two products. Results differ from the plain form by float32 rounding only, because sums
run in another order (tests/test_model.py checks both against each other).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BTV, targets_BT):
    """Mean next-token cross-entropy of full logits, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT).mean()


def _chunks(h_ND, targets_N, chunk: int):
    """(C, R, D) features, (C, R) targets and (C, R) weights (1/N, 0 on padding rows), R = chunk."""
    N = h_ND.shape[0]
    R = min(chunk, N)
    C = -(-N // R)
    pad = C * R - N
    weights_N = jnp.full((N,), 1.0 / N, jnp.float32)
    if pad:
        h_ND = jnp.pad(h_ND, ((0, pad), (0, 0)))
        targets_N, weights_N = jnp.pad(targets_N, (0, pad)), jnp.pad(weights_N, (0, pad))
    return h_ND.reshape(C, R, -1), targets_N.reshape(C, R), weights_N.reshape(C, R)


def _chunk_logits(x_RD, w_VD):
    """The output layer on one chunk: (R, V) logits in the compute dtype, then float32."""
    return jnp.dot(x_RD, w_VD.T).astype(jnp.float32)


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
def chunked_cross_entropy(h_ND, w_VD, targets_N, vocab_size: int, chunk: int):
    """Mean cross-entropy of the logits h @ w[:vocab_size].T, `chunk` rows at a time.

    h_ND: final features in the compute dtype; w_VD: the (padded) output matrix, float32;
    targets_N: int token ids below vocab_size. Rows of w past vocab_size are never predicted.
    """
    hs, ts, ws = _chunks(h_ND, targets_N, chunk)
    w = _real_vocab(w_VD, vocab_size, h_ND.dtype)

    def body(total, inputs):
        x_RD, t_R, wt_R = inputs
        loss, _, _ = _chunk_loss(_chunk_logits(x_RD, w), t_R, wt_R)
        return total + loss, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ws))
    return total


def _forward_and_gradients(h_ND, w_VD, targets_N, vocab_size: int, chunk: int):
    N, D = h_ND.shape
    dtype = h_ND.dtype
    hs, ts, ws = _chunks(h_ND, targets_N, chunk)
    w = _real_vocab(w_VD, vocab_size, dtype)

    def body(carry, inputs):
        total, dw_VD = carry
        x_RD, t_R, wt_R = inputs
        loss, exp_RV, sum_R = _chunk_loss(_chunk_logits(x_RD, w), t_R, wt_R)
        # d loss / d logits = (softmax - one_hot(target)) * weight, in float32, then the compute dtype
        probs_RV = exp_RV * (1.0 / sum_R)[:, None]
        onehot_RV = jnp.arange(vocab_size)[None, :] == t_R[:, None]
        dlogits_RV = ((probs_RV - onehot_RV) * wt_R[:, None]).astype(dtype)
        dx_RD = jnp.dot(dlogits_RV, w)
        dw_VD = dw_VD + jnp.dot(dlogits_RV.T, x_RD, preferred_element_type=jnp.float32)
        return (total + loss, dw_VD), dx_RD

    init = (jnp.zeros((), jnp.float32), jnp.zeros((vocab_size, D), jnp.float32))
    (total, dw_VD), dxs = jax.lax.scan(body, init, (hs, ts, ws))
    dh_ND = dxs.reshape(-1, D)[:N]
    dw_VD = jnp.pad(dw_VD, ((0, w_VD.shape[0] - vocab_size), (0, 0))).astype(w_VD.dtype)
    return total, (dh_ND, dw_VD)


def _fwd(h_ND, w_VD, targets_N, vocab_size, chunk):
    total, grads = _forward_and_gradients(h_ND, w_VD, targets_N, vocab_size, chunk)
    return total, grads


def _bwd(vocab_size, chunk, grads, g):
    dh_ND, dw_VD = grads
    return (g * dh_ND).astype(dh_ND.dtype), g * dw_VD, None


chunked_cross_entropy.defvjp(_fwd, _bwd)
