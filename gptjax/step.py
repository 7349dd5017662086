"""The loss and the pure training and evaluation steps that every parallel strategy wraps.

A step is a function of (train state, batch, key): the state is a plain pytree
{"params", "opt_state", "step"}, the model's structure (graphdef) is closed over, and
the strategy supplies `reduce`, the mean over data-parallel replicas (identity on one).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def cross_entropy(logits_BTV, targets_BT):
    """Mean next-token cross-entropy in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT).mean()


def loss_fn(graphdef, params, x_BT, y_BT, dropout_key=None):
    model = nnx.merge(graphdef, params)
    logits_BTV = model(x_BT, deterministic=dropout_key is None, rngs=dropout_key)
    return cross_entropy(logits_BTV, y_BT)


def make_train_step(graphdef, tx: optax.GradientTransformation, dropout: float,
                    reduce: Callable = lambda tree: tree):
    """A step over a batch of shape (A, b, T): A micro-batches whose gradients are averaged."""
    grad_fn = jax.value_and_grad(lambda p, x, y, k: loss_fn(graphdef, p, x, y, k))

    def train_step(state, x_ABT, y_ABT, key):
        params = state["params"]
        key = jax.random.fold_in(key, state["step"])
        A = x_ABT.shape[0]

        def micro(carry, inputs):
            loss_sum, grad_sum = carry
            i, x_BT, y_BT = inputs
            k = jax.random.fold_in(key, i) if dropout > 0 else None
            loss, grads = grad_fn(params, x_BT, y_BT, k)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros),
                                        (jnp.arange(A), x_ABT, y_ABT))
        loss, grads = reduce((loss / A, jax.tree.map(lambda g: g / A, grads)))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(graphdef, reduce: Callable = lambda tree: tree):
    def eval_step(params, x_BT, y_BT):
        return reduce(loss_fn(graphdef, params, x_BT, y_BT))

    return eval_step
