"""Continuous batching: one decoding thread over a fixed number of KV-cache slots.

Each slot is one row with a cache of its own (its own write index, positions and valid keys), the
busy rows stacked on a leading axis and decoded together by one `jax.vmap`-ed step. A new request is
prefilled alone (its prompt right-padded to a length bucket, powers of two from 16, so prompt lengths
compile a few prefills, not one each), written into the next free row and joins at the next step; a
row that ends (end-of-text, a stop string, max_tokens, a cancelled request) frees its slot at once,
and the last busy row moves into it, so that the busy rows are always the first ones.

A call of the step decodes `steps` tokens for every busy row in one compiled loop (--scheduler_steps,
as vLLM's multi-step scheduling does): the call, the host's reading of the tokens and the streaming
are paid once per `steps` tokens, not once a token, at the cost of a new request waiting up to that
many steps to join, and of the tokens a row decodes past its end in the call, which are dropped.
The step decodes only a few widths of rows (1, 4, 16, ... up to --slots: `widths`), the smallest that
holds the busy ones: one client costs a one-row step, sixteen a sixteen-row one. The stacked cache has
the current width's rows, grown or cut by one width when the busy rows cross one, a copy of the rows
that happens as requests come and go, never at every step. Every width's step, row write, row move
and resize, and the prefill of every bucket, are compiled before the first request: nothing compiles
as requests come and go. Each row samples with its own temperature, top-k, top-p and seed: token t
is drawn with fold_in(key(seed), t). What only some requests need is computed only in steps where a
row needs it, under `lax.cond`: the sampling filters when a row samples (greedy rows take the
argmax), the log-probabilities and the TOP most likely tokens when a row asked for logprobs, and a
prompt's own log-probabilities (`echo` with `logprobs`) in its prefill.
"""

from __future__ import annotations

import functools
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.inference.generate import GEMV_ROWS, _compute_params, _ordered_bits, _threshold, argmax, output_matrix
from gptjax.inference.serve import SCHEDULER_STEPS
from gptjax.inference.stops import StopText
from gptjax.model.score import bucket

TOP = 5  # the most likely tokens a step reports with logprobs: OpenAI's completions take logprobs up to 5


def widths(slots: int) -> list[int]:
    """The row counts a step is compiled for: powers of 4 below the slots, and the slots."""
    out, w = [], 1
    while w < slots:
        out.append(w)
        w *= 4
    return [*out, slots]


def pick(logits_nV, seed_n, t_n, temp_n, topk_n, topp_n):
    """Each row's token: the argmax where its temperature is 0, else drawn with its own filters and key.
    Where no row samples, nothing but the argmax is computed."""
    V = logits_nV.shape[-1]
    greedy_n = argmax(logits_nV)

    def sample(_):
        x_nV = logits_nV / jnp.where(temp_n > 0, temp_n, 1.0)[:, None]
        keys_nV = _ordered_bits(x_nV)
        kth_n1 = _threshold(keys_nV, jnp.int32(1), topk_n[:, None])
        x_nV = jnp.where(((topk_n > 0) & (topk_n < V))[:, None] & (keys_nV < kth_n1), -jnp.inf, x_nV)
        cut_n1 = _threshold(keys_nV, jax.nn.softmax(x_nV, axis=-1), topp_n[:, None])
        x_nV = jnp.where((topp_n < 1)[:, None] & (keys_nV < cut_n1), -jnp.inf, x_nV)
        gumbel = jax.vmap(lambda s, t: jax.random.gumbel(jax.random.fold_in(jax.random.key(s), t), (V,)))
        return jnp.where(temp_n == 0, greedy_n, argmax(x_nV + gumbel(seed_n, t_n)))

    return jax.lax.cond(jnp.any(temp_n > 0), sample, lambda _: greedy_n, None)


def scores(logits_nV, tok_n, want):
    """Each row's log-probability of tok_n and its TOP most likely tokens (ids and log-probabilities, the
    likeliest first); zeros unless `want`. TOP argmax passes, not lax.top_k, which is a full sort on the CPU."""
    n = logits_nV.shape[0]

    def compute(_):
        logp_nV = jax.nn.log_softmax(logits_nV.astype(jnp.float32), axis=-1)
        chosen_n = jnp.take_along_axis(logp_nV, tok_n[:, None], axis=1)[:, 0]
        ids, lps, x_nV = [], [], logp_nV
        for _ in range(TOP):
            i_n = argmax(x_nV)
            ids.append(i_n), lps.append(jnp.take_along_axis(x_nV, i_n[:, None], axis=1)[:, 0])
            x_nV = x_nV.at[jnp.arange(n), i_n].set(-jnp.inf)
        return chosen_n, jnp.stack(ids, 1), jnp.stack(lps, 1)

    def skip(_):
        return jnp.zeros(n, jnp.float32), jnp.zeros((n, TOP), jnp.int32), jnp.zeros((n, TOP), jnp.float32)

    return jax.lax.cond(want, compute, skip, None)


@functools.partial(jax.jit, static_argnames=("graphdef", "S"))
def _prefill(params, prompt_1P, length, controls, want, echo, *, graphdef, S):
    """One right-padded prompt through the model: its first token and that token's scores, its cache, and
    with `echo` each prompt token's scores (position i: token i + 1's)."""
    model = nnx.merge(graphdef, params)
    P = prompt_1P.shape[1]
    mask_1P = jnp.arange(P)[None, :] < length
    cache = model.init_cache(1, S)
    logits_1PV, cache = model.decode(prompt_1P, cache, positions_BT=jnp.arange(P)[None, :], token_mask_BT=mask_1P)
    logits_1V = jax.lax.dynamic_index_in_dim(logits_1PV[0], length - 1, keepdims=True)
    tok = pick(logits_1V, *(c[None] for c in controls))
    prompt = scores(logits_1PV[0], jnp.roll(prompt_1P[0], -1), echo)
    return tok[0], [x[0] for x in scores(logits_1V, tok, want)], prompt, {**cache, "index": length}


@functools.partial(jax.jit, donate_argnames=("caches",))
def _insert(caches, cache, slot):
    return jax.tree.map(lambda all_, one: all_.at[slot].set(one), caches, cache)


@functools.partial(jax.jit, donate_argnames=("caches",))
def _move(caches, src, dst):
    return jax.tree.map(lambda a: a.at[dst].set(a[src]), caches)


@functools.partial(jax.jit, static_argnames=("W",))
def _resize(caches, *, W):
    """The first W rows, or every row and empty ones up to W."""
    def one(a):
        if a.shape[0] >= W:
            return a[:W]
        return jnp.concatenate([a, jnp.zeros((W - a.shape[0], *a.shape[1:]), a.dtype)])

    return jax.tree.map(one, caches)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"), donate_argnames=("caches",))
def _step(params, head_DV, caches, tok_n, pos_n, controls, want, *, graphdef, steps):
    """`steps` tokens for every row of `caches`, in one compiled loop, with the parameters already in the compute
    dtype (and the output layer as generate's output_matrix where head_DV is given: one row, on a CPU). Returns
    each row's tokens (n, steps), their log-probabilities (n, steps) and tops (n, steps, TOP) twice, the caches."""
    model = nnx.merge(graphdef, params)
    seed_n, t_n, temp_n, topk_n, topp_n = controls

    def one(cache, tok, pos):
        logits_11V, cache = model.decode(tok[None, None], cache, positions_BT=pos[None, None], head_DV=head_DV)
        return logits_11V[0, 0], cache

    # One row decodes as a batch of one, its cache unstacked outside the loop: sliced and stacked again inside
    # it, the cache was copied at every token (0.8 ms of 4.3 a token at batch 1, the reference shape, this CPU).
    one_row = tok_n.shape[0] == 1

    def rows(caches, tok_n, pos_n):
        if not one_row:
            return jax.vmap(one)(caches, tok_n, pos_n)
        logits_11V, cache = model.decode(tok_n[:, None], caches, positions_BT=pos_n[:, None], head_DV=head_DV)
        return logits_11V[:, 0], cache

    def step(carry, i):
        caches, tok_n = carry
        logits_nV, caches = rows(caches, tok_n, pos_n + i)
        tok_n = pick(logits_nV, seed_n, t_n + i, temp_n, topk_n, topp_n)
        return (caches, tok_n), (tok_n, scores(logits_nV, tok_n, want))

    if one_row:
        caches = jax.tree.map(lambda a: a[0], caches)
    (caches, _), (tok_kn, (logp_kn, ids_knN, lps_knN)) = jax.lax.scan(step, (caches, tok_n), jnp.arange(steps))
    if one_row:
        caches = jax.tree.map(lambda a: a[None], caches)
    return tok_kn.T, logp_kn.T, ids_knN.transpose(1, 0, 2), lps_knN.transpose(1, 0, 2), caches


@dataclass
class Request:
    """One completion's row: `emit(ids, logprobs, tops, text, finish_reason or None)` is called from the decoding
    thread, `tops` each token's TOP likeliest (id, log-probability) pairs where `logprobs` asked for them;
    finish_reason "error" when the server failed. With `echo` and `logprobs`, `prompt_scores` is set before the first
    emit: each prompt token's log-probability and tops, from its second token on."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stops: list[str]
    emit: Callable
    logprobs: bool = False
    echo: bool = False
    cancelled: bool = False
    produced: int = 0  # steps taken, the end-of-text one included: the index of the next token's key
    tokens: int = 0  # the completion's tokens
    text: StopText | None = field(default=None, repr=False)
    prompt_scores: tuple[list, list] | None = field(default=None, repr=False)


def _tops(ids_nN, lps_nN) -> list[list[tuple[int, float]]]:
    return [list(zip(map(int, i), map(float, lp))) for i, lp in zip(ids_nN, lps_nN)]


class Batcher:
    """The slots and the thread that decodes them; `submit` a Request, set its `cancelled` to drop it.
    The busy rows are rows[:busy], and the stacked cache has `width` rows, one of `widths(slots)`."""

    def __init__(self, model, slots: int = 16, steps: int = SCHEDULER_STEPS):
        self.model, self.n, self.steps = model, slots, steps
        self.S = model.config.model.block_size
        self.eot = model.tokenizer.eot_id
        self.widths = widths(slots)
        self.width = self.widths[0]
        self.params = _compute_params(model.params, jnp.dtype(model.dtype))  # once, not at every step
        self.head_DV = output_matrix(model.graphdef, model.params)  # for steps of at most GEMV_ROWS rows
        one = model.model.init_cache(1, self.S)
        self.caches = jax.tree.map(lambda a: jnp.broadcast_to(a, (self.width, *a.shape)).copy(), one)
        self.rows: list[Request | None] = [None] * slots
        self.tok = np.zeros(slots, np.int32)
        self.pos = np.zeros(slots, np.int32)
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="gptjax-serve-decoder")
        self.closed = False
        self.failure = ""  # what stopped the decoding thread, if something did

    def warm(self) -> None:
        """Compile every prefill bucket, and at every width the step, the row write and move, and the resizes to
        the widths beside it, before any request: run each once on the empty rows."""
        controls = tuple(a[0] for a in self._controls([None]))
        P = 0
        while P < self.S:
            P = bucket(P + 1, self.S)
            *_, cache = _prefill(self.model.params, np.zeros((1, P), np.int32), np.int32(1), controls, False, False,
                                 graphdef=self.model.graphdef, S=self.S)
        for i, W in enumerate(self.widths):
            self._resize(W)
            self.caches = _insert(self.caches, cache, np.int32(0))
            self.caches = _move(self.caches, np.int32(0), np.int32(W - 1))
            self._decode(False)
            if i:
                self._resize(self.widths[i - 1])
                self._resize(W)
        self._resize(self.widths[0])

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.closed = True
        self.pending.put(None)
        self.thread.join(timeout=60)

    def submit(self, request: Request) -> None:
        request.text = StopText(self.model.tokenizer, request.stops)
        if self.failure:
            self._tell(request, [], [], None, "", "error")
            return
        self.pending.put(request)

    def busy(self) -> int:
        return sum(r is not None for r in self.rows)

    def _controls(self, rows):
        c = [(r.seed, r.produced, r.temperature, r.top_k, r.top_p) if r else (0, 0, 0.0, 0, 1.0) for r in rows]
        seed, t, temp, k, p = zip(*c)
        return (np.asarray(seed, np.uint32), np.asarray(t, np.int32), np.asarray(temp, np.float32),
                np.asarray(k, np.int32), np.asarray(p, np.float32))

    def _resize(self, W: int) -> None:
        """The stacked cache at width W, one width at a time (the resizes compiled are between neighbours)."""
        while self.width != W:
            i = self.widths.index(self.width)
            self.width = self.widths[i + 1 if W > self.width else i - 1]
            self.caches = _resize(self.caches, W=self.width)

    def _decode(self, want: bool):
        """A call of the step over the cache's rows (its width); `want`: a row asked for logprobs."""
        W = self.width
        head_DV = self.head_DV if W <= GEMV_ROWS else None
        *out, self.caches = _step(self.params, head_DV, self.caches, self.tok[:W], self.pos[:W],
                                  self._controls(self.rows[:W]), want, graphdef=self.model.graphdef, steps=self.steps)
        return [np.asarray(x) for x in out]

    def _admit(self, r: Request) -> None:
        slot = self.busy()
        if slot == self.width:
            self._resize(self.widths[self.widths.index(self.width) + 1])
        L = len(r.ids)
        P = bucket(L, self.S)
        prompt = np.zeros((1, P), np.int32)
        prompt[0, :L] = r.ids
        controls = tuple(a[0] for a in self._controls([r]))
        tok, first, prompt_scores, cache = _prefill(self.model.params, prompt, np.int32(L), controls, r.logprobs,
                                                    r.echo and r.logprobs, graphdef=self.model.graphdef, S=self.S)
        if r.echo and r.logprobs:
            lp, ids, lps = (np.asarray(x)[:L - 1] for x in prompt_scores)
            r.prompt_scores = lp.tolist(), _tops(ids, lps)
        self.caches = _insert(self.caches, cache, np.int32(slot))
        self.rows[slot], self.pos[slot] = r, L
        logp, ids, lps = (np.asarray(x) for x in first)
        self._take(slot, [int(tok)], [float(logp)], _tops(ids[None], lps[None]))
        self._compact()

    def _take(self, slot: int, toks: list[int], logps: list[float], tops: list) -> None:
        """Hand a row's new tokens to its request, up to where it ends (the tokens decoded past that are dropped);
        a row that has ended is set to None (_compact then closes the gap)."""
        r = self.rows[slot]
        reason, ids = None, []
        for tok in toks:
            r.produced += 1
            if tok == self.eot:
                reason = "stop"
                break
            ids.append(tok)
            r.tokens += 1
            if r.text.feed([tok]):
                reason = "stop"
            elif r.produced >= r.max_tokens:
                reason = "length"
            if reason:
                break
        if reason:
            r.text.finish()
        n = len(ids)
        self._tell(r, ids, logps[:n], tops[:n] if r.logprobs else None, r.text.take(), reason)
        if reason or r.cancelled:
            self.rows[slot] = None
        else:
            self.tok[slot] = toks[-1]

    def _compact(self) -> None:
        """Move the busy rows past the first free ones into them, then narrow the cache to the busy rows' width."""
        busy = [s for s, r in enumerate(self.rows) if r is not None]
        holes = [s for s in range(len(busy)) if self.rows[s] is None]
        for dst, src in zip(holes, [s for s in busy if s >= len(busy)]):
            self.caches = _move(self.caches, np.int32(src), np.int32(dst))
            self.rows[dst], self.rows[src] = self.rows[src], None
            self.tok[dst], self.pos[dst] = self.tok[src], self.pos[src]
        self._resize(next(W for W in self.widths if W >= len(busy)))

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a fault of the server, not of one request: tell every request, leave none waiting
            self.failure = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            self._fail_all()

    def _fail_all(self) -> None:
        waiting = [r for r in self.rows if r is not None]
        self.rows = [None] * self.n
        while not self.pending.empty():
            waiting.append(self.pending.get_nowait())
        for r in waiting:
            if r is not None:
                self._tell(r, [], [], None, "", "error")

    @staticmethod
    def _tell(r: Request, *event) -> None:
        if not r.cancelled:
            try:
                r.emit(*event)
            except RuntimeError:  # the request's event loop has closed: nobody waits for it
                r.cancelled = True

    def _loop(self) -> None:
        while not self.closed:
            while None in self.rows:
                try:
                    r = self.pending.get(block=self.busy() == 0)
                except queue.Empty:
                    break
                if r is None:
                    return
                if not r.cancelled:
                    self._admit(r)
            for slot, r in enumerate(self.rows):
                if r is not None and r.cancelled:
                    self.rows[slot] = None
            self._compact()
            b = self.busy()
            if not b:
                continue
            want = any(r.logprobs for r in self.rows[:b])
            tok, logp, top_ids, top_lps = self._decode(want)
            self.pos[:b] += self.steps
            for slot in range(b):
                tops = _tops(top_ids[slot], top_lps[slot]) if want else [None] * self.steps
                self._take(slot, tok[slot].tolist(), logp[slot].tolist(), tops)
            self._compact()
