"""A GPT-2 style decoder in Flax NNX.

Dimension letters used in names and shape comments:
  B batch   T time (query positions)   S key/value positions (cache length)
  D model width   N heads   H head width   F feed-forward width (4D)   V padded vocabulary
  X batch and heads together (B·N), the cache's leading dimension

Parameter names follow GPT-2 (`wte`, `wpe`, `h`, `ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`, `ln_f`), so weight import is a name table. Linear kernels are stored
(in, out) as in GPT-2's Conv1D. The output layer is the token embedding, transposed.

The KV cache is an explicit pytree, passed in and returned:
  {"index": int32 scalar (positions filled), "valid": bool (B, S) (keys that are real tokens,
   not left padding), "layers": [{"k": (X, S, H), "v": (X, S, H)}, ...]}
in the compute dtype, with X = B·N: row b·N + n holds head n of sequence b.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.loss import chunked_cross_entropy, cross_entropy

INIT_STD = 0.02
# what a rematerialised block keeps for the backward pass (jax.checkpoint policies); the rest is recomputed
REMAT = {"block": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _linear(cfg: ModelConfig, d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=cfg.bias, dtype=_dtype(cfg.dtype), param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros, rngs=rngs,
    )


def _layer_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.n_embd, epsilon=1e-5, use_bias=cfg.bias, dtype=_dtype(cfg.dtype),
                         param_dtype=jnp.float32, rngs=rngs)


def sincos_encoding(positions_BT: jax.Array, d: int) -> jax.Array:
    """The fixed encoding of 'Attention Is All You Need': sin on even, cos on odd features."""
    i = jnp.arange(d // 2, dtype=jnp.float32)
    freq = jnp.exp(-math.log(10000.0) * 2.0 * i / d)  # (D/2,)
    angle = positions_BT[..., None].astype(jnp.float32) * freq  # (B, T, D/2)
    pe = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)  # (B, T, D/2, 2)
    pe = pe.reshape(*positions_BT.shape, -1)
    return pe if d % 2 == 0 else jnp.pad(pe, ((0, 0), (0, 0), (0, 1)))


def attention_implementation(q_BTNH) -> str | None:
    """cuDNN's fused (flash) attention where it applies: an NVIDIA GPU, 16-bit compute, heads of at
    most 128 features in multiples of 8. Elsewhere None, XLA's own. GPTJAX_ATTENTION=xla forces XLA."""
    H = q_BTNH.shape[-1]
    if (os.environ.get("GPTJAX_ATTENTION", "auto") == "xla" or jax.default_backend() != "gpu"
            or q_BTNH.dtype not in (jnp.bfloat16, jnp.float16) or H > 128 or H % 8):
        return None
    return "cudnn"


def causal_attention(q_BTNH, k_BTNH, v_BTNH):
    """Causal self-attention over full sequences, through jax.nn.dot_product_attention."""
    implementation = attention_implementation(q_BTNH)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True, implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError):  # a cuDNN too old for the fused kernel
            pass
    return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True)


def _cached_attention(q_XTH, k_XSH, v_XSH, mask_XTS):
    """jax.nn.dot_product_attention's arithmetic (float32 scores and softmax) on the cache's layout."""
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_XTH.dtype == jnp.bfloat16 else None
    scores_XTS = jnp.einsum("XTH,XSH->XTS", q_XTH, k_XSH, precision=precision,
                            preferred_element_type=jnp.promote_types(q_XTH.dtype, jnp.float32))
    scores_XTS = scores_XTS * jnp.asarray(1.0 / math.sqrt(q_XTH.shape[-1]), scores_XTS.dtype)
    scores_XTS = jnp.where(mask_XTS, scores_XTS, -0.7 * jnp.finfo(scores_XTS.dtype).max)
    probs_XTS = jax.nn.softmax(scores_XTS.astype(jnp.float32), axis=-1).astype(k_XSH.dtype)
    return jnp.einsum("XTS,XSH->XTH", probs_XTS, v_XSH)


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D = cfg.n_embd
        self.n_head = cfg.n_head
        self.c_attn = _linear(cfg, D, 3 * D, INIT_STD, rngs)
        self.c_proj = _linear(cfg, D, D, INIT_STD / math.sqrt(2 * cfg.n_layer), rngs)
        self.resid_dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BTD, *, cache=None, index=None, valid_BS=None, deterministic=True, rngs=None):
        B, T, D = x_BTD.shape
        N = self.n_head
        qkv = self.c_attn(x_BTD)
        q_BTNH, k_BTNH, v_BTNH = (a.reshape(B, T, N, D // N) for a in jnp.split(qkv, 3, axis=-1))
        if cache is None:
            y_BTNH = causal_attention(q_BTNH, k_BTNH, v_BTNH)
        else:
            # the cache is kept (X, S, H), X = B·N rows of one head's keys or values: the attention
            # dots read it as it lies, where other layouts cost the CPU a copy or a transpose per step
            H = D // N
            q_XTH, k_XTH, v_XTH = (a.transpose(0, 2, 1, 3).reshape(B * N, T, H) for a in (q_BTNH, k_BTNH, v_BTNH))
            k_XSH = jax.lax.dynamic_update_slice(cache["k"], k_XTH.astype(cache["k"].dtype), (0, index, 0))
            v_XSH = jax.lax.dynamic_update_slice(cache["v"], v_XTH.astype(cache["v"].dtype), (0, index, 0))
            cache = {"k": k_XSH, "v": v_XSH}
            S = k_XSH.shape[1]
            # key s is visible to query t when it is a real token and not in t's future
            causal_TS = jnp.arange(S)[None, :] <= (index + jnp.arange(T))[:, None]
            mask_XTS = jnp.repeat(causal_TS[None, :, :] & valid_BS[:, None, :], N, axis=0)
            y_XTH = _cached_attention(q_XTH, k_XSH.astype(q_XTH.dtype), v_XSH.astype(q_XTH.dtype), mask_XTS)
            y_BTNH = y_XTH.reshape(B, N, T, H).transpose(0, 2, 1, 3)
        y_BTD = self.c_proj(y_BTNH.reshape(B, T, D))
        return self.resid_dropout(y_BTD, deterministic=deterministic, rngs=rngs), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D = cfg.n_embd
        self.c_fc = _linear(cfg, D, 4 * D, INIT_STD, rngs)
        self.c_proj = _linear(cfg, 4 * D, D, INIT_STD / math.sqrt(2 * cfg.n_layer), rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BTD, *, deterministic=True, rngs=None):
        h_BTF = jax.nn.gelu(self.c_fc(x_BTD), approximate=True)  # GPT-2's tanh GELU
        return self.dropout(self.c_proj(h_BTF), deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTD, *, cache=None, index=None, valid_BS=None, deterministic=True, rngs=None):
        a_BTD, cache = self.attn(self.ln_1(x_BTD), cache=cache, index=index, valid_BS=valid_BS,
                                 deterministic=deterministic, rngs=rngs)
        x_BTD = x_BTD + a_BTD
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD), deterministic=deterministic, rngs=rngs)
        return x_BTD, cache


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be resolved (from the tokenizer) before building a model")
        self.cfg = cfg
        emb_init = nnx.initializers.normal(INIT_STD)
        self.wte = nnx.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=_dtype(cfg.dtype),
                             param_dtype=jnp.float32, embedding_init=emb_init, rngs=rngs)
        if cfg.pos_encoding == "learned":
            self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, dtype=_dtype(cfg.dtype),
                                 param_dtype=jnp.float32, embedding_init=emb_init, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)
        self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)

    def _embed(self, idx_BT, positions_BT, deterministic, rngs):
        x_BTD = self.wte(idx_BT)
        if self.cfg.pos_encoding == "learned":
            x_BTD = x_BTD + self.wpe(positions_BT)
        else:
            x_BTD = x_BTD + sincos_encoding(positions_BT, self.cfg.n_embd).astype(x_BTD.dtype)
        return self.drop(x_BTD, deterministic=deterministic, rngs=rngs)

    def _logits(self, x_BTD):
        logits_BTV = self.wte.attend(self.ln_f(x_BTD)).astype(jnp.float32)
        V = self.cfg.vocab_size
        if self.cfg.padded_vocab_size > V:  # padded ids are never predicted
            logits_BTV = jnp.where(jnp.arange(logits_BTV.shape[-1]) < V, logits_BTV, -jnp.inf)
        return logits_BTV

    def features(self, idx_BT, *, deterministic=True, rngs=None, remat: str = "none"):
        """The last block's output for a batch of full sequences, before the final layer norm.

        `remat` (see REMAT) trades compute for memory in a backward pass: "block" keeps only each
        block's input and recomputes the rest, "dots" also keeps the matrix products' outputs.
        """
        B, T = idx_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        x_BTD = self._embed(idx_BT, positions_BT, deterministic, rngs)
        run = lambda blk, x, r: blk(x, deterministic=deterministic, rngs=r)[0]  # noqa: E731
        if remat != "none":
            run = nnx.remat(run, policy=REMAT[remat])
        for block in self.h:
            x_BTD = run(block, x_BTD, rngs)
        return x_BTD

    def __call__(self, idx_BT, *, deterministic=True, rngs=None):
        """Logits (float32, padded vocabulary) for every position of a batch of full sequences."""
        return self._logits(self.features(idx_BT, deterministic=deterministic, rngs=rngs))

    def loss(self, idx_BT, targets_BT, *, chunk: int = 0, remat: str = "none", deterministic=True, rngs=None):
        """Mean next-token cross-entropy; `chunk` > 0 computes it that many tokens at a time
        (loss.chunked_cross_entropy), never holding the whole batch's logits."""
        x_BTD = self.features(idx_BT, deterministic=deterministic, rngs=rngs, remat=remat)
        if chunk <= 0:
            return cross_entropy(self._logits(x_BTD), targets_BT)
        h_BTD = self.ln_f(x_BTD).astype(_dtype(self.cfg.dtype))
        return chunked_cross_entropy(h_BTD, self.wte.embedding[...], targets_BT, self.cfg.vocab_size, chunk)

    def init_cache(self, batch_size: int, length: int | None = None, dtype=None):
        cfg = self.cfg
        S = length or cfg.block_size
        shape = (batch_size * cfg.n_head, S, cfg.n_embd // cfg.n_head)
        dtype = dtype or _dtype(cfg.dtype)
        return {
            "index": jnp.zeros((), jnp.int32),
            "valid": jnp.zeros((batch_size, S), jnp.bool_),
            "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layer)],
        }

    def decode(self, idx_BT, cache, *, positions_BT=None, token_mask_BT=None, last_only=False):
        """Run T new tokens through the model on top of `cache`; return their logits and the new cache.

        `token_mask_BT` marks real tokens (False for left padding); `positions_BT` defaults to
        the cache index onwards, which is right when no row is padded. `last_only` returns the
        logits of the last position alone (B, 1, V), all a prefill needs: the output layer is
        the largest matrix, and a prompt's other positions would multiply by it for nothing.
        """
        B, T = idx_BT.shape
        index = cache["index"]
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(index + jnp.arange(T), (B, T))
        if token_mask_BT is None:
            token_mask_BT = jnp.ones((B, T), jnp.bool_)
        valid_BS = jax.lax.dynamic_update_slice(cache["valid"], token_mask_BT, (0, index))
        x_BTD = self._embed(idx_BT, positions_BT, True, None)
        layers = []
        for block, layer_cache in zip(self.h, cache["layers"]):
            x_BTD, layer_cache = block(x_BTD, cache=layer_cache, index=index, valid_BS=valid_BS)
            layers.append(layer_cache)
        new_cache = {"index": index + T, "valid": valid_BS, "layers": layers}
        return self._logits(x_BTD[:, -1:] if last_only else x_BTD), new_cache


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
