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

from gptjax.config import TrainConfig

LOSS_CHUNK = TrainConfig.loss_chunk  # the default, as in training


def loss_fn(graphdef, params, x_BT, y_BT, dropout_key=None, loss_chunk: int = 0, remat: str = "none"):
    model = nnx.merge(graphdef, params)
    return model.loss(x_BT, y_BT, chunk=loss_chunk, remat=remat, deterministic=dropout_key is None, rngs=dropout_key)


def make_train_step(graphdef, tx: optax.GradientTransformation, dropout: float,
                    reduce: Callable = lambda tree: tree, skip_nonfinite: bool = False,
                    loss_chunk: int = LOSS_CHUNK, remat: str = "none"):
    """A step over a batch of shape (A, b, T): A micro-batches whose gradients are averaged.

    With `skip_nonfinite`, a step whose loss or gradient is not finite leaves parameters and
    optimizer state as they were (the step counter still advances, so the batches stay aligned).
    """
    grad_fn = jax.value_and_grad(lambda p, x, y, k: loss_fn(graphdef, p, x, y, k, loss_chunk, remat))

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
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # a finite loss and gradient can still give an overflowing update: check what is applied too
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
            new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": ok}
        return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(graphdef, reduce: Callable = lambda tree: tree, loss_chunk: int = LOSS_CHUNK):
    """The validation loss: the mean negative log-likelihood from the model's one scorer (GPT.token_logprobs)."""
    def eval_step(params, x_BT, y_BT):
        logp_BT, _ = nnx.merge(graphdef, params).token_logprobs(x_BT, y_BT, chunk=loss_chunk)
        return reduce(-logp_BT.mean())

    return eval_step
