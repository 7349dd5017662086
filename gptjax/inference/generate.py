"""Autoregressive sampling: prefill the prompt, then decode from a KV cache inside compiled code.

Prompts of different lengths are left-padded to a bucket length (powers of two from 16), with a
padding mask and per-row positions, so a new prompt length rarely means a new compilation and
each row continues exactly as it would alone. The batch and the number of new tokens are
bucketed alike, and the cache holds only the padded prompt and this call's new tokens.

The decoding loop is a `lax.while_loop` in `jax.jit` that runs up to a step given as an argument,
so one compiled loop serves a whole generation in one call, or a stream of short chunks that
return to Python between calls (the state, cache included, is donated and returned). Token t
is drawn with the key fold_in(key, t), so chunking never changes a sample: the streamed text is
the text. A generation longer than the context goes on in segments: the last 3/4 of the context
is prefilled again and decoding resumes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.config import check_sampling
from gptjax.model.gpt import compute_dtype
from gptjax.model.score import bucket  # padded lengths, as the scorer pads: powers of two from 16

CHECK_EVERY = 16  # tokens decoded between two checks of should_end (stop strings)


def _ordered_bits(x_BV):
    """int32 keys in the order of the float32 values: the threshold searches below compare these."""
    i_BV = jax.lax.bitcast_convert_type(x_BV.astype(jnp.float32), jnp.int32)
    return jnp.where(i_BV < 0, i_BV ^ 0x7FFFFFFF, i_BV)


def _threshold(keys_BV, weight_BV, target_B1):
    """The largest key t among each row's keys with weight(keys ≥ t) ≥ target, by bisection: 32 passes
    that compare and add. jax.lax.top_k and jnp.sort cost 8 ms a step inside a decoding loop on the CPU
    (XLA lowers them to a full sort there), this 0.4 ms."""
    lo_B1 = jnp.full(target_B1.shape, jnp.iinfo(jnp.int32).min, jnp.int32)  # weight(keys ≥ lo) ≥ target
    hi_B1 = jnp.full(target_B1.shape, jnp.iinfo(jnp.int32).max, jnp.int32)  # weight(keys ≥ hi) < target

    def halve(_, bounds):
        lo_B1, hi_B1 = bounds
        mid_B1 = (lo_B1 >> 1) + (hi_B1 >> 1) + (lo_B1 & hi_B1 & 1)  # the floor of the mean, without overflow
        ok_B1 = jnp.sum(jnp.where(keys_BV >= mid_B1, weight_BV, 0), axis=-1, keepdims=True) >= target_B1
        return jnp.where(ok_B1, mid_B1, lo_B1), jnp.where(ok_B1, hi_B1, mid_B1)

    return jax.lax.fori_loop(0, 32, halve, (lo_B1, hi_B1))[0]


def filter_logits(logits_BV, temperature, top_k: int, top_p=None):
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf.

    top-k keeps the entries at least as large as the k-th largest; top-p then keeps the smallest
    set of the largest entries whose probability reaches top_p. `top_p` may be traced; None or a
    number ≥ 1 turns nucleus filtering off.
    """
    logits_BV = logits_BV / temperature
    B, V = logits_BV.shape
    keys_BV = _ordered_bits(logits_BV)
    if 0 < top_k < V:
        kth_B1 = _threshold(keys_BV, jnp.int32(1), jnp.full((B, 1), top_k, jnp.int32))
        logits_BV = jnp.where(keys_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None and not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        probs_BV = jax.nn.softmax(logits_BV, axis=-1)
        cutoff_B1 = _threshold(keys_BV, probs_BV, jnp.full((B, 1), top_p, jnp.float32))
        logits_BV = jnp.where(keys_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def argmax(x_BV):
    """jnp.argmax(x_BV, -1) (the first of equal maxima) as two plain reductions: on the CPU, 2 to 4x
    faster than argmax's reduction of (value, index) pairs, which costs a decoding step 4% at batch 1."""
    V = x_BV.shape[-1]
    top_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x_BV == top_B1, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def sample_token(logits_BV, key, temperature, top_k: int, top_p=None):
    if isinstance(temperature, (int, float)) and temperature == 0:
        return argmax(logits_BV)
    # jax.random.categorical's Gumbel-max draw, with the faster argmax
    logits_BV = filter_logits(logits_BV, temperature, top_k, top_p)
    return argmax(logits_BV + jax.random.gumbel(key, logits_BV.shape, logits_BV.dtype))


class Sampling(NamedTuple):
    """What the compiled code depends on; temperature and top-p values are arguments, not constants."""

    greedy: bool
    top_k: int
    nucleus: bool
    eot_id: int


class DecodeState(NamedTuple):
    i: jax.Array  # tokens written to out_BN so far
    tok_B: jax.Array  # each row's latest token, not yet in the cache
    pos_B: jax.Array  # its position
    done_B: jax.Array  # the row has produced end-of-text
    out_BN: jax.Array  # the new tokens; end-of-text after a row is done
    cache: dict


def _sample(logits_BV, key, temperature, top_p, sampling: Sampling):
    if sampling.greedy:
        return argmax(logits_BV)
    return sample_token(logits_BV, key, temperature, sampling.top_k, top_p if sampling.nucleus else None)


def _compute_params(params, dtype):
    """Parameters in the compute dtype, once per call: the model casts each one to it at every use
    anyway (the same cast), and half the bytes are read per token in bfloat16."""
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_out", "sampling"))
def _prefill(params, prompt_BP, mask_BP, key, temperature, top_p, *, graphdef, n_out, sampling):
    """The state after the left-padded prompts and their first new token, with room for `n_out` in all."""
    model = nnx.merge(graphdef, params)
    B, P = prompt_BP.shape
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
    cache = model.init_cache(B, P + n_out)
    logits_B1V, cache = model.decode(prompt_BP, cache, positions_BT=positions_BP, token_mask_BT=mask_BP,
                                     last_only=True)
    tok_B = _sample(logits_B1V[:, 0], jax.random.fold_in(key, 0), temperature, top_p, sampling)
    out_BN = jnp.full((B, n_out), sampling.eot_id, jnp.int32).at[:, 0].set(tok_B)
    return DecodeState(jnp.int32(1), tok_B, positions_BP[:, -1] + 1, tok_B == sampling.eot_id, out_BN, cache)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _output_matrix(params, *, graphdef):
    return nnx.merge(graphdef, params).output_matrix()


# XLA's CPU backend multiplies by a matrix of at most this many rows as matrix-vector products, where the
# output layer's layout matters (measured, 384 x 50,304 in float32, 2-core Zen 3: 1 row 1.56x and 2 rows
# 1.50x faster from the (D, V) copy); from 4 rows on as a matrix product, 7% faster from the stored layout.
GEMV_ROWS = 2


def output_matrix(graphdef, params):
    """On a CPU, the output layer copied once as a (D, V) matrix for the decoding loop at batch 1 and 2
    (GPT.output_matrix: read at the memory's full speed, where the stored layout reaches about 63%), at
    the cost of that copy's memory while sampling; elsewhere None (the layer as it is)."""
    return _output_matrix(params, graphdef=graphdef) if jax.default_backend() == "cpu" else None


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("state",))
def _decode(params, head_DV, state: DecodeState, stop, key, temperature, top_p, *, graphdef, sampling):
    """Decode until `stop` tokens are written or every row has ended."""
    dtype = compute_dtype(nnx.merge(graphdef, params).cfg)
    model = nnx.merge(graphdef, _compute_params(params, dtype))
    if state.tok_B.shape[0] > GEMV_ROWS:  # a matrix product: the stored layout is the faster one
        head_DV = None

    def cond(s: DecodeState):
        return (s.i < stop) & ~jnp.all(s.done_B)

    def body(s: DecodeState):
        logits_B1V, cache = model.decode(s.tok_B[:, None], s.cache, positions_BT=s.pos_B[:, None], head_DV=head_DV)
        new_B = _sample(logits_B1V[:, 0], jax.random.fold_in(key, s.i), temperature, top_p, sampling)
        new_B = jnp.where(s.done_B, sampling.eot_id, new_B)
        return DecodeState(s.i + 1, new_B, s.pos_B + 1, s.done_B | (new_B == sampling.eot_id),
                           s.out_BN.at[:, s.i].set(new_B), cache)

    return jax.lax.while_loop(cond, body, state)


def _with_done(state: DecodeState, done: np.ndarray) -> DecodeState:
    """The state with these rows marked done: the loop writes nothing more for them and ends when all
    are. An array of the same shape and type, put on the device: nothing compiles."""
    return state._replace(done_B=jax.device_put(np.array(state.done_B) | done))


def _left_padded(contexts: list[list[int]], B: int, P: int) -> tuple[np.ndarray, np.ndarray]:
    """The contexts left-padded to P positions, and their mask, in B rows: spare rows repeat the first."""
    prompt_BP = np.zeros((B, P), np.int32)
    mask_BP = np.zeros((B, P), bool)
    for i in range(B):
        c = contexts[i] if i < len(contexts) else contexts[0]
        prompt_BP[i, P - len(c):] = c
        mask_BP[i, P - len(c):] = True
    return prompt_BP, mask_BP


def _new_ids(out_BN: np.ndarray, active: list[int], ended: list[bool], eot_id: int, n_prompts: int) -> list[list[int]]:
    """Each prompt's ids in `out_BN` (row k: prompt active[k]), cut before end-of-text: none for a row that
    had ended, and a row that reaches end-of-text here is marked in `ended`."""
    new: list[list[int]] = [[] for _ in range(n_prompts)]
    for row, r in enumerate(active):
        if ended[row]:
            continue
        ids = out_BN[row].tolist()
        if eot_id in ids:
            ids, ended[row] = ids[: ids.index(eot_id)], True
        new[r] = ids
    return new


def _start_segment(graphdef, params, contexts: list[list[int]], n: int, key, controls, sampling: Sampling, *,
                   block_size: int) -> tuple[DecodeState, int]:
    """The prefill of a segment: its rows' contexts left-padded to buckets of length and count, room for `n`
    new tokens. Returns the decoding state and the rows it holds (spare ones repeat the first context)."""
    P, N = bucket(max(map(len, contexts)), block_size), bucket(n, block_size)
    B = bucket(len(contexts), limit=1 << 30, smallest=1)
    prompt_BP, mask_BP = _left_padded(contexts, B, P)
    state = _prefill(params, prompt_BP, mask_BP, key, *controls, graphdef=graphdef, n_out=N, sampling=sampling)
    if B > len(contexts):  # spare rows would keep the loop running after every real row has ended
        state = _with_done(state, np.arange(B) >= len(contexts))
    return state, B


def stream_ids(graphdef, params, prompts: list[list[int]], *, block_size: int, eot_id: int,
               max_new_tokens: int, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0, chunk: int = 0, should_end: Callable[[int, list[int]], bool] | None = None,
               head_DV: jax.Array | None = None) -> Iterator[list[list[int]]]:
    """Yield the new token ids of every prompt as they come, one list per prompt (empty when it has
    nothing new) each time decoding returns to Python: once per segment, or every `chunk` tokens.

    A row ends before end-of-text or after `max_new_tokens`; the id lists never hold end-of-text.
    `should_end(prompt index, its new ids)` is asked about each piece before it is yielded; True
    ends that row there (a stop string, say): it is marked done in the decoding state, so the
    compiled loop stops working on it and ends when every row has, with no new compilation.
    With `should_end` and no `chunk`, decoding returns to Python every CHECK_EVERY tokens to ask.
    `head_DV`: output_matrix(graphdef, params) kept from an earlier call (made here otherwise).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if should_end is not None and chunk <= 0:
        chunk = CHECK_EVERY
    prompts = [list(p[-block_size:]) or [eot_id] for p in prompts]  # an empty prompt starts a document
    sampling = Sampling(greedy=temperature == 0, top_k=int(top_k), nucleus=top_p < 1.0, eot_id=int(eot_id))
    controls = (jnp.float32(temperature or 1.0), jnp.float32(top_p))
    seqs = [list(p) for p in prompts]
    produced = [0] * len(prompts)
    active = list(range(len(prompts)))
    base_key = jax.random.key(seed)
    if head_DV is None and len(prompts) <= GEMV_ROWS:
        head_DV = output_matrix(graphdef, params)
    segment = 0
    while active:
        # rows still running have all produced the same number of tokens; none may pass the context
        contexts = [seqs[r][-(block_size if segment == 0 else max(1, block_size * 3 // 4)):] for r in active]
        n = min(max_new_tokens - produced[active[0]], block_size - max(map(len, contexts)) + 1)
        key = jax.random.fold_in(base_key, segment)
        state, B = _start_segment(graphdef, params, contexts, n, key, controls, sampling, block_size=block_size)
        ended = [False] * len(active)
        start = 0
        while True:
            if chunk <= 0:
                stop = n
            else:  # a stream shows the prefill's token at once, then every `chunk` tokens
                stop = min(n, start + chunk) if start else 1
            if stop > max(start, 1):  # the prefill made token 0
                state = _decode(params, head_DV, state, jnp.int32(stop), key, *controls, graphdef=graphdef,
                                sampling=sampling)
            i = int(state.i)
            out_BN = np.array(state.out_BN)[:, start:i]  # a copy, on the host: the state is donated next
            new = _new_ids(out_BN, active, ended, eot_id, len(prompts))
            stopped = np.zeros(B, bool)
            for row, r in enumerate(active):
                ids = new[r]
                seqs[r] += ids
                produced[r] += len(ids)
                if should_end is not None and ids and should_end(r, ids) and not ended[row]:
                    ended[row] = stopped[row] = True
            yield new
            start = i
            if i >= n or all(ended):
                break
            if stopped.any():
                state = _with_done(state, stopped)
        active = [r for row, r in enumerate(active) if not ended[row] and produced[r] < max_new_tokens]
        segment += 1


def generate_ids(graphdef, params, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    """New token ids for each prompt (without the prompt), ending before end-of-text if it came.

    Keyword arguments as for `stream_ids`; the result does not depend on `chunk`.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for new in stream_ids(graphdef, params, prompts, **kwargs):
        for r, ids in enumerate(new):
            out[r] += ids
    return out
