"""A GPT-2 style decoder in Flax NNX, with the modern options as switches on the same modules.

Dimension letters used in names and shape comments:
  B batch   T time (query positions)   S key/value positions (cache length)
  D model width   N heads   K key/value heads (N for GPT-2; fewer with grouped-query attention)
  G query heads per key/value head (N / K)   H head width   F feed-forward width   V padded vocabulary
  X batch and key/value heads together (B·K), the cache's leading dimension

Parameter names follow GPT-2 (`wte`, `wpe`, `h`, `ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`, `ln_f`), so weight import is a name table. Linear kernels are stored
(in, out) as in GPT-2's Conv1D. The output layer is the token embedding, transposed, unless
tie_embeddings is off (then `lm_head`, also (V, D)).

The defaults are GPT-2 exactly. The options (ModelConfig): rotary or no position encoding,
RMSNorm, QK-norm (`attn.q_norm`, `attn.k_norm`), squared-ReLU or SwiGLU feed-forward layers
(SwiGLU's `c_fc` holds gate and value side by side), grouped-query attention (`c_attn` then
makes N query heads and K key and value heads), an untied output layer, no biases. A model built
with a document rule (`docs`, gptjax.model.documents: --data.doc_mask) stops attention at end-of-text.

The KV cache is an explicit pytree, passed in and returned:
  {"index": int32 scalar (positions filled), "valid": bool (B, S) (keys that are real tokens,
   not left padding), "layers": [{"k": (X, S, H), "v": (X, S, H)}, ...]}
in the compute dtype, with X = B·K: row b·K + k holds key/value head k of sequence b. Keys are
cached after their rotary encoding; a model with `docs` also keeps each key's document there
({"docs": ...}, gptjax.model.documents). With scan_layers, `h` is one Block whose parameters are stacked
on a leading layer axis (gptjax.model.stacked), run with nnx.scan, and the cache's "layers" is one
{"k": (L, X, S, H), "v": …}.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.model import documents, products
from gptjax.model.attention import cached_attention, causal_attention
from gptjax.model.documents import Documents
from gptjax.model.loss import chunked_cross_entropy, cross_entropy, token_logprobs

INIT_STD = 0.02
# what a rematerialised block keeps for the backward pass (jax.checkpoint policies); the rest is recomputed
REMAT = {"block": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def resolve_dtype(cfg: ModelConfig) -> str:
    """'float32' or 'bfloat16': cfg.dtype, or what auto stands for here for this model's shape (decided once
    per process and shape, on its own step's products: products.decision)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return products.decision(cfg).dtype


def _dtype(cfg: ModelConfig):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[resolve_dtype(cfg)]


def compute_dtype(cfg: ModelConfig):
    """The dtype the model computes in (what --model.dtype, auto resolved, stands for)."""
    return jnp.dtype(_dtype(cfg))


def _linear(cfg: ModelConfig, d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    # the product through products.dot_general: in bfloat16 on a CPU the plain forms (float32 unchanged)
    return nnx.Linear(
        d_in, d_out, use_bias=cfg.bias, dtype=_dtype(cfg), param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std), bias_init=nnx.initializers.zeros, rngs=rngs,
        dot_general=products.dot_general, promote_dtype=products.keep_kernel,
    )


def _norm(cfg: ModelConfig, features: int, rngs: nnx.Rngs, kind: str | None = None):
    if (kind or cfg.norm) == "rmsnorm":
        return nnx.RMSNorm(features, epsilon=1e-6, dtype=_dtype(cfg), param_dtype=jnp.float32, rngs=rngs)
    return nnx.LayerNorm(features, epsilon=1e-5, use_bias=cfg.bias, dtype=_dtype(cfg),
                         param_dtype=jnp.float32, rngs=rngs)


def rotary(x_BTNH, positions_BT, base: float):
    """Rotary position encoding: feature pairs (i, i + H/2) turned by position · base^(-2i/H)."""
    half = x_BTNH.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
    angle_BT1h = (positions_BT[..., None].astype(jnp.float32) * freq)[:, :, None, :]
    cos, sin = jnp.cos(angle_BT1h), jnp.sin(angle_BT1h)
    x1, x2 = x_BTNH[..., :half].astype(jnp.float32), x_BTNH[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x_BTNH.dtype)


def sincos_encoding(positions_BT: jax.Array, d: int) -> jax.Array:
    """The fixed encoding of 'Attention Is All You Need': sin on even, cos on odd features."""
    i = jnp.arange(d // 2, dtype=jnp.float32)
    freq = jnp.exp(-math.log(10000.0) * 2.0 * i / d)  # (D/2,)
    angle = positions_BT[..., None].astype(jnp.float32) * freq  # (B, T, D/2)
    pe = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)  # (B, T, D/2, 2)
    pe = pe.reshape(*positions_BT.shape, -1)
    return pe if d % 2 == 0 else jnp.pad(pe, ((0, 0), (0, 0), (0, 1)))


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, K = cfg.n_embd, cfg.n_head, cfg.kv_heads
        H = D // N
        self.n_head, self.n_kv_head = N, K
        self.rope_base = cfg.rope_base if cfg.pos_encoding == "rope" else None
        self.c_attn = _linear(cfg, D, (N + 2 * K) * H, INIT_STD, rngs)
        self.c_proj = _linear(cfg, D, D, INIT_STD / math.sqrt(2 * cfg.n_layer), rngs)
        if cfg.qk_norm:
            self.q_norm = _norm(cfg, H, rngs, "rmsnorm")
            self.k_norm = _norm(cfg, H, rngs, "rmsnorm")
        self.qk_norm = cfg.qk_norm
        self.resid_dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BTD, positions_BT, *, cache=None, index=None, valid_BS=None, same_BTS=None,
                 deterministic=True, rngs=None):
        B, T, D = x_BTD.shape
        N, K = self.n_head, self.n_kv_head
        H, G = D // N, N // K
        q, k, v = jnp.split(self.c_attn(x_BTD), [N * H, (N + K) * H], axis=-1)
        q_BTNH, k_BTKH, v_BTKH = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        if self.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        if self.rope_base is not None:
            q_BTNH, k_BTKH = rotary(q_BTNH, positions_BT, self.rope_base), rotary(k_BTKH, positions_BT, self.rope_base)
        if cache is None:
            y_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, same_BTS)
        else:
            # the cache is kept (X, S, H), X = B·K rows of one key/value head: the attention dots read
            # it as it lies, where other layouts cost the CPU a copy or a transpose per step. The G
            # query heads that share a key/value head are stacked as G·T query rows against it.
            q_XQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, H)
            k_XTH, v_XTH = (a.transpose(0, 2, 1, 3).reshape(B * K, T, H) for a in (k_BTKH, v_BTKH))
            k_XSH = jax.lax.dynamic_update_slice(cache["k"], k_XTH.astype(cache["k"].dtype), (0, index, 0))
            v_XSH = jax.lax.dynamic_update_slice(cache["v"], v_XTH.astype(cache["v"].dtype), (0, index, 0))
            cache = {"k": k_XSH, "v": v_XSH}
            S = k_XSH.shape[1]
            # key s is visible to query t when it is a real token and not in t's future
            causal_TS = jnp.arange(S)[None, :] <= (index + jnp.arange(T))[:, None]
            mask_BQS = jnp.tile(causal_TS, (G, 1))[None, :, :] & valid_BS[:, None, :]
            if same_BTS is not None:  # and in t's own document
                mask_BQS = mask_BQS & jnp.tile(same_BTS, (1, G, 1))
            mask_XQS = jnp.repeat(mask_BQS, K, axis=0)
            y_XQH = cached_attention(q_XQH, k_XSH.astype(q_XQH.dtype), v_XSH.astype(q_XQH.dtype), mask_XQS)
            y_BTNH = y_XQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
        y_BTD = self.c_proj(y_BTNH.reshape(B, T, D))
        return self.resid_dropout(y_BTD, deterministic=deterministic, rngs=rngs), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.n_embd, cfg.ffn_width
        self.kind = cfg.mlp
        self.c_fc = _linear(cfg, D, 2 * F if cfg.mlp == "swiglu" else F, INIT_STD, rngs)
        self.c_proj = _linear(cfg, F, D, INIT_STD / math.sqrt(2 * cfg.n_layer), rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BTD, *, deterministic=True, rngs=None):
        h_BTF = self.c_fc(x_BTD)
        if self.kind == "gelu":
            h_BTF = jax.nn.gelu(h_BTF, approximate=True)  # GPT-2's tanh GELU
        elif self.kind == "relu2":
            h_BTF = jnp.square(jax.nn.relu(h_BTF))
        else:
            gate_BTF, value_BTF = jnp.split(h_BTF, 2, axis=-1)
            h_BTF = jax.nn.silu(gate_BTF) * value_BTF
        return self.dropout(self.c_proj(h_BTF), deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = _norm(cfg, cfg.n_embd, rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ln_2 = _norm(cfg, cfg.n_embd, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BTD, positions_BT, *, cache=None, index=None, valid_BS=None, same_BTS=None,
                 deterministic=True, rngs=None):
        a_BTD, cache = self.attn(self.ln_1(x_BTD), positions_BT, cache=cache, index=index, valid_BS=valid_BS,
                                 same_BTS=same_BTS, deterministic=deterministic, rngs=rngs)
        x_BTD = x_BTD + a_BTD
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD), deterministic=deterministic, rngs=rngs)
        return x_BTD, cache


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """n_layer blocks as one, every parameter stacked on a leading layer axis (gptjax.model.stacked), each
    layer initialised from its own split of the keys."""
    @nnx.split_rngs(splits=cfg.n_layer)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(cfg, rngs)

    return make(rngs)


class GPT(nnx.Module):
    """`docs` (gptjax.model.documents, from the run's data options and tokenizer): attention stops at
    end-of-text, and with its restart positions restart at each document; None: one causal stream."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, docs: Documents | None = None):
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be resolved (from the tokenizer) before building a model")
        self.cfg = cfg
        self.docs = docs
        emb_init = nnx.initializers.normal(INIT_STD)
        self.wte = nnx.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=_dtype(cfg),
                             param_dtype=jnp.float32, embedding_init=emb_init, rngs=rngs)
        if cfg.pos_encoding == "learned":
            self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, dtype=_dtype(cfg),
                                 param_dtype=jnp.float32, embedding_init=emb_init, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)
        self.h = stacked_blocks(cfg, rngs) if cfg.scan_layers else nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _norm(cfg, cfg.n_embd, rngs)
        if not cfg.tie_embeddings:  # zero at the start: every token equally likely, as the loss begins
            self.lm_head = nnx.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=_dtype(cfg),
                                     param_dtype=jnp.float32, embedding_init=nnx.initializers.zeros, rngs=rngs)

    @property
    def output_layer(self) -> nnx.Embed:
        return self.wte if self.cfg.tie_embeddings else self.lm_head

    def _embed(self, idx_BT, positions_BT, deterministic, rngs):
        x_BTD = self.wte(idx_BT)
        if self.cfg.pos_encoding == "learned":
            x_BTD = x_BTD + self.wpe(positions_BT)
        elif self.cfg.pos_encoding == "sincos":
            x_BTD = x_BTD + sincos_encoding(positions_BT, self.cfg.n_embd).astype(x_BTD.dtype)
        return self.drop(x_BTD, deterministic=deterministic, rngs=rngs)

    def _logits(self, x_BTD, head_DV=None):
        plain = products.plain_forms(_dtype(self.cfg))
        if head_DV is not None:  # the same product, from the output layer laid out as output_matrix() gives it
            h_BTD = self.ln_f(x_BTD).astype(head_DV.dtype)
            if plain:  # accumulated in float32, as the plain forms are
                logits_BTV = jnp.dot(h_BTD, head_DV, preferred_element_type=jnp.float32)
            else:
                logits_BTV = jnp.dot(h_BTD, head_DV).astype(jnp.float32)
        elif plain:
            logits_BTV = products.head_product(self.ln_f(x_BTD).astype(_dtype(self.cfg)),
                                               self.output_layer.embedding[...])
        else:
            logits_BTV = self.output_layer.attend(self.ln_f(x_BTD)).astype(jnp.float32)
        V = self.cfg.vocab_size
        if self.cfg.padded_vocab_size > V:  # padded ids are never predicted
            logits_BTV = jnp.where(jnp.arange(logits_BTV.shape[-1]) < V, logits_BTV, -jnp.inf)
        return logits_BTV

    def _scan_layers(self, body, x_BTD, xs=None):
        """body(x, block, x_i) -> (x, y_i) over the stacked layers, one block compiled (jax.lax.scan of the
        split block state: unlike nnx.scan, usable where the model was merged outside a surrounding loop,
        as the sampler's while_loop does)."""
        graphdef, state = nnx.split(self.h)
        return jax.lax.scan(lambda x, layer: body(x, nnx.merge(graphdef, layer[0]), layer[1]), x_BTD, (state, xs))

    def features(self, idx_BT, *, deterministic=True, rngs=None, remat: str = "none", positions_BT=None):
        """The last block's output for a batch of full sequences, before the final layer norm.

        `remat` (see REMAT) trades compute for memory in a backward pass: "block" keeps only each
        block's input and recomputes the rest, "dots" also keeps the matrix products' outputs.
        `positions_BT` default to 0, 1, ..., T - 1 (restarted at each document with docs' restart).
        """
        B, T = idx_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        same_BTT = None
        if self.docs is not None:
            segment_BT, positions_BT = documents.window(self.docs, idx_BT, positions_BT)
            same_BTT = documents.same_document(segment_BT, segment_BT)
        x_BTD = self._embed(idx_BT, positions_BT, deterministic, rngs)
        run = lambda blk, x, p, m, r: blk(x, p, same_BTS=m, deterministic=deterministic, rngs=r)[0]  # noqa: E731
        if remat != "none":  # per block, and so inside the scanned body
            run = nnx.remat(run, policy=REMAT[remat])
        if self.cfg.scan_layers:  # every layer the same dropout key, as in the loop below
            return self._scan_layers(lambda x, blk, _: (run(blk, x, positions_BT, same_BTT, rngs), None), x_BTD)[0]
        for block in self.h:
            x_BTD = run(block, x_BTD, positions_BT, same_BTT, rngs)
        return x_BTD

    def __call__(self, idx_BT, *, deterministic=True, rngs=None, positions_BT=None):
        """Logits (float32, padded vocabulary) for every position of a batch of full sequences."""
        return self._logits(self.features(idx_BT, deterministic=deterministic, rngs=rngs, positions_BT=positions_BT))

    def loss(self, idx_BT, targets_BT, *, chunk: int = 0, remat: str = "none", deterministic=True, rngs=None):
        """Mean next-token cross-entropy; `chunk` > 0 computes it that many tokens at a time
        (loss.chunked_cross_entropy), never holding the whole batch's logits."""
        x_BTD = self.features(idx_BT, deterministic=deterministic, rngs=rngs, remat=remat)
        if chunk <= 0:
            return cross_entropy(self._logits(x_BTD), targets_BT)
        h_BTD = self.ln_f(x_BTD).astype(_dtype(self.cfg))
        return chunked_cross_entropy(h_BTD, self.output_layer.embedding[...], targets_BT, self.cfg.vocab_size, chunk)

    def token_logprobs(self, idx_BT, targets_BT, *, chunk: int = 2048):
        """log p(target | the sequence up to it) at every position (float32), and whether each target was the
        model's first choice: the scorer of every figure (loss.token_logprobs), through the output layer."""
        h_BTD = self.ln_f(self.features(idx_BT)).astype(_dtype(self.cfg))
        return token_logprobs(h_BTD, self.output_layer.embedding[...], targets_BT, self.cfg.vocab_size, chunk)

    def init_cache(self, batch_size: int, length: int | None = None, dtype=None):
        cfg = self.cfg
        S = length or cfg.block_size
        shape = (batch_size * cfg.kv_heads, S, cfg.n_embd // cfg.n_head)
        dtype = dtype or _dtype(cfg)
        if cfg.scan_layers:  # stacked as the blocks are: (L, X, S, H)
            layers = {"k": jnp.zeros((cfg.n_layer, *shape), dtype), "v": jnp.zeros((cfg.n_layer, *shape), dtype)}
        else:
            layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layer)]
        cache = {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch_size, S), jnp.bool_), "layers": layers}
        return cache if self.docs is None else {**cache, "docs": documents.init_cache(batch_size, S)}

    def output_matrix(self):
        """The output layer as a (D, V) matrix in the compute dtype, for `decode`'s head_DV. The layer is
        stored (V, D), one row per token; a matrix-vector product on a CPU reads it in that layout at
        about 63% of the memory's speed, and the (D, V) copy at full speed (XLA 0.10, 2-core Zen 3, the
        GPT-2 vocabulary at width 384). Decoding one token at a time reads this matrix, the largest of
        the model, once per token."""
        return self.output_layer.embedding[...].astype(_dtype(self.cfg)).T

    def decode(self, idx_BT, cache, *, positions_BT=None, token_mask_BT=None, last_only=False, head_DV=None):
        """Run T new tokens through the model on top of `cache`; return their logits and the new cache.

        `token_mask_BT` marks real tokens (False for left padding); `positions_BT` defaults to
        the cache index onwards, which is right when no row is padded. `last_only` returns the
        logits of the last position alone (B, 1, V), all a prefill needs: the output layer is
        the largest matrix, and a prompt's other positions would multiply by it for nothing.
        `head_DV`, output_matrix() made once, replaces the output layer in the last product.
        With `docs` the cache keeps each key's document, so a prompt that holds end-of-text decodes as
        the full forward computes it (positions_BT, as given, then restart with each document).
        """
        B, T = idx_BT.shape
        index = cache["index"]
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(index + jnp.arange(T), (B, T))
        if token_mask_BT is None:
            token_mask_BT = jnp.ones((B, T), jnp.bool_)
        valid_BS = jax.lax.dynamic_update_slice(cache["valid"], token_mask_BT, (0, index))
        same_BTS, docs_cache = None, {}
        if self.docs is not None:  # the prompt's documents, as the full-sequence forward sees them
            same_BTS, positions_BT, docs = documents.extend_cache(self.docs, cache["docs"], idx_BT, positions_BT,
                                                                  token_mask_BT, index)
            docs_cache = {"docs": docs}
        x_BTD = self._embed(idx_BT, positions_BT, True, None)
        run = lambda x, blk, c: blk(x, positions_BT, cache=c, index=index, valid_BS=valid_BS,  # noqa: E731
                                    same_BTS=same_BTS)
        if self.cfg.scan_layers:
            x_BTD, layers = self._scan_layers(run, x_BTD, cache["layers"])
        else:
            layers = []
            for block, layer_cache in zip(self.h, cache["layers"]):
                x_BTD, layer_cache = run(x_BTD, block, layer_cache)
                layers.append(layer_cache)
        new_cache = {"index": index + T, "valid": valid_BS, "layers": layers, **docs_cache}
        return self._logits(x_BTD[:, -1:] if last_only else x_BTD, head_DV), new_cache


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


@functools.lru_cache(maxsize=8)
def abstract(cfg: ModelConfig, per_layer: bool = False, docs: Documents | None = None):
    """The model built from shapes alone, nothing allocated: its graph and its parameters as plain nested
    dicts of ShapeDtypeStructs (the names checkpoints use). per_layer: blocks as GPT-2 names them
    (h/0, h/1, ...) whatever cfg.scan_layers says. The one shapes-only build of the model, cached per
    shape, so a notebook that reloads a run every few seconds pays for it once. `docs`: the document
    rule the graph carries (gptjax.model.documents.of_run); it holds no parameters."""
    if per_layer:
        cfg = dataclasses.replace(cfg, scan_layers=False)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0), docs)), nnx.Param)
    return graphdef, nnx.to_pure_dict(params)
