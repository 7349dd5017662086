"""The optimizer: global-norm clipping, then AdamW with weight decay on matrices only, under a linear
warm-up and cosine decay. With --train.optimizer=muon, the blocks' weight matrices are updated by
Muon (optax.contrib.muon: momentum orthogonalised by Newton-Schulz iterations) at --train.muon_lr
on the same schedule, and everything else (embeddings, output layer, norms, biases) by the AdamW
above."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gptjax.config import TrainConfig
from gptjax.model.stacked import per_layer_ndim


def learning_rate(cfg: TrainConfig, peak: float | None = None):
    """Warm up linearly from lr/warmup to lr (step 0 already learns), then cosine down to min_lr.
    `peak` puts another peak on the same shape (min_lr scaled with it)."""
    warmup = max(cfg.warmup_steps, 0)
    decay_steps = max(cfg.max_steps - warmup, 1)
    top = cfg.lr if peak is None else peak
    bottom = cfg.min_lr * top / cfg.lr

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = top * (step + 1) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = bottom + 0.5 * (top - bottom) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """Decay weight matrices and embeddings; leave biases and layer-norm scales alone (stacked too)."""
    return jax.tree_util.tree_map_with_path(lambda path, p: per_layer_ndim(path, p) >= 2, params)


def block_matrix(path, p) -> bool:
    """A weight matrix inside the blocks (attention and feed-forward kernels): what Muon updates."""
    return per_layer_ndim(path, p) == 2 and getattr(path[0], "key", None) == "h"


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "muon":
        # the matrix is a leaf's last two axes: a stacked block's leading layer axis is a batch of matrices
        muon = optax.contrib.muon(learning_rate(cfg, cfg.muon_lr), beta=0.95, weight_decay=cfg.weight_decay,
                                  muon_weight_dimension_numbers=optax.contrib.MuonDimensionNumbers(-2, -1))
        labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, p: "muon" if block_matrix(path, p) else "adamw", params)
        update = optax.partition({"muon": muon, "adamw": adamw}, labels)
    else:
        update = adamw
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), update)
    return update
