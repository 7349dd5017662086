"""Continuous batching: one decoding thread over a fixed number of KV-cache slots.

Each slot is one row with a cache of its own (its own write index, positions and valid keys), the
slots stacked on a leading axis and decoded together by one `jax.vmap`-ed step. A new request is
prefilled alone (its prompt right-padded to a length bucket, powers of two from 16, so prompt lengths
compile a few prefills, not one each), written into a free slot and joins at the next step; a row that
ends (end-of-text, a stop string, max_tokens, a cancelled request) frees its slot at once. The step,
the prefills and the slot write have fixed shapes: nothing compiles as requests come and go. Each row
samples with its own temperature, top-k, top-p and seed: token t is drawn with fold_in(key(seed), t).
The step decodes every slot, busy or not, so its cost is that of --slots rows whatever the load: a
server of many slots answers one client at a time more slowly than `gptjax sample` does
(`python -m gptjax.bench serve` measures both).
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

from gptjax.inference.generate import _compute_params, _ordered_bits, _threshold, argmax
from gptjax.inference.stops import StopText
from gptjax.model.gpt import compute_dtype
from gptjax.model.score import bucket


def pick(logits_nV, seed_n, t_n, temp_n, topk_n, topp_n):
    """Each row's token (greedy where its temperature is 0) and its log-probability under the model."""
    V = logits_nV.shape[-1]
    x_nV = logits_nV / jnp.where(temp_n > 0, temp_n, 1.0)[:, None]
    keys_nV = _ordered_bits(x_nV)
    kth_n1 = _threshold(keys_nV, jnp.int32(1), topk_n[:, None])
    x_nV = jnp.where(((topk_n > 0) & (topk_n < V))[:, None] & (keys_nV < kth_n1), -jnp.inf, x_nV)
    cut_n1 = _threshold(keys_nV, jax.nn.softmax(x_nV, axis=-1), topp_n[:, None])
    x_nV = jnp.where((topp_n < 1)[:, None] & (keys_nV < cut_n1), -jnp.inf, x_nV)
    gumbel = jax.vmap(lambda s, t: jax.random.gumbel(jax.random.fold_in(jax.random.key(s), t), (V,)))
    tok_n = jnp.where(temp_n == 0, argmax(logits_nV), argmax(x_nV + gumbel(seed_n, t_n)))
    logp_nV = jax.nn.log_softmax(logits_nV.astype(jnp.float32), axis=-1)
    return tok_n, jnp.take_along_axis(logp_nV, tok_n[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "S"))
def _prefill(params, prompt_1P, length, controls, *, graphdef, S):
    """One right-padded prompt through the model: its first token, that token's log-probability, its cache."""
    model = nnx.merge(graphdef, params)
    P = prompt_1P.shape[1]
    mask_1P = jnp.arange(P)[None, :] < length
    cache = model.init_cache(1, S)
    logits_1PV, cache = model.decode(prompt_1P, cache, positions_BT=jnp.arange(P)[None, :], token_mask_BT=mask_1P)
    logits_1V = jax.lax.dynamic_index_in_dim(logits_1PV[0], length - 1, keepdims=True)
    tok, logp = pick(logits_1V, *(c[None] for c in controls))
    return tok[0], logp[0], {**cache, "index": length}  # the next token is written over the first padding


@functools.partial(jax.jit, donate_argnames=("caches",))
def _insert(caches, cache, slot):
    return jax.tree.map(lambda all_, one: all_.at[slot].set(one), caches, cache)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("caches",))
def _step(params, caches, tok_n, pos_n, controls, *, graphdef):
    """One token for every slot. The parameters are cast to the compute dtype once, as generate's loop does."""
    model = nnx.merge(graphdef, _compute_params(params, compute_dtype(nnx.merge(graphdef, params).cfg)))

    def one(cache, tok, pos):
        logits_11V, cache = model.decode(tok[None, None], cache, positions_BT=pos[None, None])
        return logits_11V[0, 0], cache

    logits_nV, caches = jax.vmap(one)(caches, tok_n, pos_n)
    tok_n, logp_n = pick(logits_nV, *controls)
    return tok_n, logp_n, caches


@dataclass
class Request:
    """One completion's row: `emit(ids, logprobs, text, finish_reason or None)` is called from the decoding thread;
    finish_reason "error" when the server failed."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stops: list[str]
    emit: Callable
    cancelled: bool = False
    produced: int = 0  # steps taken, the end-of-text one included: the index of the next token's key
    tokens: int = 0  # the completion's tokens
    text: StopText | None = field(default=None, repr=False)


class Batcher:
    """The slots and the thread that decodes them; `submit` a Request, set its `cancelled` to drop it."""

    def __init__(self, model, slots: int = 16):
        self.model, self.n = model, slots
        self.S = model.config.model.block_size
        self.eot = model.tokenizer.eot_id
        one = model.model.init_cache(1, self.S)
        self.caches = jax.tree.map(lambda a: jnp.broadcast_to(a, (slots, *a.shape)).copy(), one)
        self.rows: list[Request | None] = [None] * slots
        self.tok = np.zeros(slots, np.int32)
        self.pos = np.zeros(slots, np.int32)
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="gptjax-serve-decoder")
        self.closed = False
        self.failure = ""  # what stopped the decoding thread, if something did

    def warm(self) -> None:
        """Compile the step, the slot write and the prefill of every prompt-length bucket before any request."""
        P = 0
        while P < self.S:
            P = bucket(P + 1, self.S)
            controls = tuple(a[0] for a in self._controls([None]))
            _, _, cache = _prefill(self.model.params, np.zeros((1, P), np.int32), np.int32(1), controls,
                                   graphdef=self.model.graphdef, S=self.S)
        self.caches = _insert(self.caches, cache, np.int32(0))
        _, _, self.caches = _step(self.model.params, self.caches, self.tok, self.pos, self._controls(self.rows),
                                  graphdef=self.model.graphdef)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.closed = True
        self.pending.put(None)
        self.thread.join(timeout=60)

    def submit(self, request: Request) -> None:
        request.text = StopText(self.model.tokenizer, request.stops)
        if self.failure:
            self._tell(request, [], [], "", "error")
            return
        self.pending.put(request)

    def busy(self) -> int:
        return sum(r is not None for r in self.rows)

    def _controls(self, rows):
        c = [(r.seed, r.produced, r.temperature, r.top_k, r.top_p) if r else (0, 0, 0.0, 0, 1.0) for r in rows]
        seed, t, temp, k, p = zip(*c)
        return (np.asarray(seed, np.uint32), np.asarray(t, np.int32), np.asarray(temp, np.float32),
                np.asarray(k, np.int32), np.asarray(p, np.float32))

    def _admit(self, r: Request) -> None:
        slot = self.rows.index(None)
        L = len(r.ids)
        P = bucket(L, self.S)
        prompt = np.zeros((1, P), np.int32)
        prompt[0, :L] = r.ids
        controls = tuple(a[0] for a in self._controls([r]))
        tok, logp, cache = _prefill(self.model.params, prompt, np.int32(L), controls, graphdef=self.model.graphdef,
                                    S=self.S)
        self.caches = _insert(self.caches, cache, np.int32(slot))
        self.rows[slot], self.pos[slot] = r, L
        self._take(slot, int(tok), float(logp))

    def _take(self, slot: int, tok: int, logp: float) -> None:
        """Hand one new token to its request; free the slot when the row has ended."""
        r = self.rows[slot]
        r.produced += 1
        reason = None
        if tok == self.eot:
            reason, ids, logps = "stop", [], []
        else:
            ids, logps = [tok], [logp]
            r.tokens += 1
            if r.text.feed(ids):
                reason = "stop"
            elif r.produced >= r.max_tokens:
                reason = "length"
        if reason:
            r.text.finish()
        self._tell(r, ids, logps, r.text.take(), reason)
        if reason or r.cancelled:
            self.rows[slot] = None
        else:
            self.tok[slot] = tok

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
                self._tell(r, [], [], "", "error")

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
            if not self.busy():
                continue
            tok, logp, self.caches = _step(self.model.params, self.caches, self.tok, self.pos,
                                           self._controls(self.rows), graphdef=self.model.graphdef)
            tok, logp = np.asarray(tok), np.asarray(logp)
            self.pos += 1
            for slot, r in enumerate(self.rows):
                if r is not None:
                    self._take(slot, int(tok[slot]), float(logp[slot]))
