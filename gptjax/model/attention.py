"""Attention's arithmetic, for gptjax.model.gpt: full sequences through jax.nn.dot_product_attention (cuDNN's
fused kernel on an NVIDIA GPU where it applies, XLA's elsewhere), with the causal mask and, for a model
with a document rule, the same-document mask; and the KV cache's attention on the cache's own layout.
Dimension letters as in gptjax.model.gpt."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp


def attention_implementation(q_BTNH) -> str | None:
    """cuDNN's fused (flash) attention where it applies: an NVIDIA GPU, 16-bit compute, heads of at
    most 128 features in multiples of 8. Elsewhere None, XLA's own. GPTJAX_ATTENTION=xla forces XLA."""
    H = q_BTNH.shape[-1]
    if (os.environ.get("GPTJAX_ATTENTION", "auto") == "xla" or jax.default_backend() != "gpu"
            or q_BTNH.dtype not in (jnp.bfloat16, jnp.float16) or H > 128 or H % 8):
        return None
    return "cudnn"


def causal_attention(q_BTNH, k_BSKH, v_BSKH, same_BTS=None):
    """Causal self-attention over full sequences, through jax.nn.dot_product_attention (K may be fewer
    heads than N: grouped-query attention). `same_BTS`, where given, also keeps each query inside its
    own document (gptjax.model.documents), as the mask both implementations take."""
    mask = None if same_BTS is None else same_BTS[:, None]  # (B, 1, T, S), the same for every head
    implementation = attention_implementation(q_BTNH)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=True,
                                                implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError):  # a cuDNN too old for the fused kernel
            pass
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=True)


def cached_attention(q_XTH, k_XSH, v_XSH, mask_XTS):
    """jax.nn.dot_product_attention's arithmetic (float32 scores and softmax) on the cache's layout."""
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_XTH.dtype == jnp.bfloat16 else None
    scores_XTS = jnp.einsum("XTH,XSH->XTS", q_XTH, k_XSH, precision=precision,
                            preferred_element_type=jnp.promote_types(q_XTH.dtype, jnp.float32))
    scores_XTS = scores_XTS * jnp.asarray(1.0 / math.sqrt(q_XTH.shape[-1]), scores_XTS.dtype)
    scores_XTS = jnp.where(mask_XTS, scores_XTS, -0.7 * jnp.finfo(scores_XTS.dtype).max)
    probs_XTS = jax.nn.softmax(scores_XTS.astype(jnp.float32), axis=-1).astype(k_XSH.dtype)
    return jnp.einsum("XTS,XSH->XTH", probs_XTS, v_XSH)
