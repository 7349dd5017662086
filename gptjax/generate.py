"""Autoregressive sampling: prefill the prompt, then decode from a KV cache inside compiled code.

Prompts of different lengths are left-padded to a bucket length (powers of two), with a
padding mask and per-row positions, so a new prompt length rarely means a new compilation
and each row continues exactly as it would alone. A generation longer than the context
goes on in segments: the last 3/4 of the context is prefilled again and decoding resumes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def filter_logits(logits_BV, temperature: float, top_k: int, top_p: float):
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    logits_BV = logits_BV / temperature
    V = logits_BV.shape[-1]
    if 0 < top_k < V:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass strictly above each entry
        n_keep_B = jnp.maximum(jnp.sum(before_BV < top_p, axis=-1), 1)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample_token(logits_BV, key, temperature: float, top_k: int, top_p: float):
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "temperature", "top_k", "top_p", "eot_id"))
def _decode(params, prompt_BP, mask_BP, n_new, key, *, graphdef, max_new, temperature, top_k, top_p, eot_id):
    """Up to `n_new` (≤ max_new) tokens per row after left-padded prompts; rows stop at end-of-text."""
    model = nnx.merge(graphdef, params)
    B, P = prompt_BP.shape
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
    cache = model.init_cache(B, P + max_new)
    logits_BPV, cache = model.decode(prompt_BP, cache, positions_BT=positions_BP, token_mask_BT=mask_BP)
    key, sub = jax.random.split(key)
    tok_B = sample_token(logits_BPV[:, -1], sub, temperature, top_k, top_p)
    out_BN = jnp.full((B, max_new), eot_id, jnp.int32).at[:, 0].set(tok_B)

    def cond(carry):
        i, _, _, _, _, _, done_B = carry
        return (i < n_new) & ~jnp.all(done_B)

    def body(carry):
        i, tok_B, cache, pos_B, key, out_BN, done_B = carry
        logits_B1V, cache = model.decode(tok_B[:, None], cache, positions_BT=pos_B[:, None])
        key, sub = jax.random.split(key)
        new_B = sample_token(logits_B1V[:, 0], sub, temperature, top_k, top_p)
        new_B = jnp.where(done_B, eot_id, new_B)
        out_BN = out_BN.at[:, i].set(new_B)
        return i + 1, new_B, cache, pos_B + 1, key, out_BN, done_B | (new_B == eot_id)

    carry = (jnp.int32(1), tok_B, cache, positions_BP[:, -1] + 1, key, out_BN, tok_B == eot_id)
    return jax.lax.while_loop(cond, body, carry)[5]


def bucket(n: int, limit: int, smallest: int = 16) -> int:
    """The padded prompt length: the next power of two from `smallest`, at most `limit`."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, max(limit, n))


def generate_ids(graphdef, params, prompts: list[list[int]], *, block_size: int, eot_id: int,
                 max_new_tokens: int, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0) -> list[list[int]]:
    """New token ids for each prompt (without the prompt), ending before end-of-text if it came."""
    if any(len(p) == 0 for p in prompts):
        prompts = [p or [eot_id] for p in prompts]  # an empty prompt starts a new document
    seqs = [list(p[-block_size:]) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    key = jax.random.key(seed)
    segment = 0
    while active:
        keep = block_size if segment == 0 else max(1, block_size * 3 // 4)
        contexts = [seqs[r][-keep:] for r in active]
        P = bucket(max(len(c) for c in contexts), block_size)
        n = min(max_new_tokens - len(new[active[0]]), block_size - max(len(c) for c in contexts) + 1)
        prompt = np.zeros((len(active), P), np.int32)
        mask = np.zeros((len(active), P), bool)
        for i, c in enumerate(contexts):
            prompt[i, P - len(c):] = c
            mask[i, P - len(c):] = True
        out = _decode(params, prompt, mask, jnp.int32(n), jax.random.fold_in(key, segment),
                      graphdef=graphdef, max_new=block_size, temperature=float(temperature),
                      top_k=int(top_k), top_p=float(top_p), eot_id=int(eot_id))
        out = np.asarray(out)[:, :n]
        still = []
        for i, r in enumerate(active):
            row = out[i].tolist()
            if eot_id in row:
                new[r] += row[: row.index(eot_id)]
            else:
                new[r] += row
                seqs[r] += row
                if len(new[r]) < max_new_tokens:
                    still.append(r)
        active = still
        segment += 1
    return new
