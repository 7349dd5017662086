"""The optimizer: global-norm clipping, then AdamW with weight decay on matrices only,
under a linear warm-up and cosine decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gptjax.config import TrainConfig


def learning_rate(cfg: TrainConfig):
    """Warm up linearly from lr/warmup to lr (step 0 already learns), then cosine down to min_lr."""
    warmup = max(cfg.warmup_steps, 0)
    decay_steps = max(cfg.max_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (step + 1) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """Decay weight matrices and embeddings; leave biases and layer-norm scales alone."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
