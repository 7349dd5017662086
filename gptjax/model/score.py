"""A model's compiled scoring of token windows: at every position, log p(target | the tokens before
it in the window) and whether the target was the model's first choice. The one scorer: the task
figures of evaluations during training, `gptjax.load(...).logprobs`, `python -m gptjax.eval`, bench
quality and the lm-eval harness all go through `Scorer`.

Windows go through in batches of one shape, so a run compiles once per shape: text scoring uses
full context windows only; task requests (a context and a continuation, mostly far shorter than the
context) are sorted by length and padded to a power of two (`bucket`, which sampling pads its
prompts with too), a handful of shapes. The output layer is applied a chunk of positions at a time,
so the batch's float32 logits over the vocabulary never exist at once. The arithmetic is the model's
own scorer (GPT.token_logprobs, through its output layer), the one that training's validation loss
uses too.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

LOGITS_CHUNK = 2048  # positions whose logits exist at once
SMALLEST_BUCKET = 16


def bucket(n: int, limit: int, smallest: int = SMALLEST_BUCKET) -> int:
    """The padded length: the next power of two from `smallest`, at most `limit`."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, max(limit, n))


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score(params, x_BT, y_BT, *, graphdef, chunk: int):
    return nnx.merge(graphdef, params).token_logprobs(x_BT, y_BT, chunk=chunk)


class Window(NamedTuple):
    """Inputs x and targets y (equal lengths, at most the context); positions first..end-1 are scored."""

    tag: object
    x: np.ndarray
    y: np.ndarray
    first: int
    end: int


def sliding_windows(chunks: Iterable[np.ndarray], T: int, stride: int, tag=None) -> Iterator[Window]:
    """Windows of T inputs over the concatenation of `chunks`, starting every `stride` tokens (1 ≤ stride ≤ T);
    the last one is shorter. Token 0 is only context; every later token is one window's target, once."""
    buf = np.zeros(0, np.int32)
    begin = 0  # the stream index of buf[0], the next window's first input
    scored = 0  # targets up to this stream index are done
    for chunk in chunks:
        buf = np.concatenate([buf, np.asarray(chunk, np.int32)])
        while len(buf) >= T + 1:
            yield Window(tag, buf[:T], buf[1:T + 1], scored - begin, T)
            scored = begin + T
            begin, buf = begin + stride, buf[stride:]
    n = len(buf) - 1
    if begin + n > scored:
        yield Window(tag, buf[:n], buf[1:], scored - begin, n)


class Scored(NamedTuple):
    tag: object
    logp: np.ndarray  # float32, the scored positions only
    greedy: np.ndarray  # bool: the target was the most likely token


class Scorer:
    """Scores windows of token ids with the parameters `params` of the model `graphdef`, `batch_size`
    windows at a time."""

    def __init__(self, graphdef, params, block_size: int, batch_size: int = 8, chunk: int = LOGITS_CHUNK):
        self.graphdef, self.params = graphdef, jax.device_put(params)  # on the device once, not at every batch
        self.block_size, self.batch_size, self.chunk = block_size, batch_size, chunk

    def _dispatch(self, windows: list[Window], length: int):
        """Start scoring a batch (padded to `length` positions and batch_size rows); `_collect` waits for it."""
        x = np.zeros((self.batch_size, length), np.int32)
        y = np.zeros((self.batch_size, length), np.int32)
        for i, w in enumerate(windows):
            x[i, :len(w.x)], y[i, :len(w.y)] = w.x, w.y
        return windows, _score(self.params, x, y, graphdef=self.graphdef, chunk=self.chunk)

    @staticmethod
    def _collect(pending) -> list[Scored]:
        windows, (logp, greedy) = pending
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        return [Scored(w.tag, logp[i, w.first:w.end], greedy[i, w.first:w.end]) for i, w in enumerate(windows)]

    def _pipelined(self, batches: Iterable[tuple[list[Window], int]]) -> Iterator[Scored]:
        """Scores of (batch, length) pairs in order; a batch's results are read once the next one is
        dispatched, so reading documents and cutting windows overlap the model's work."""
        pending = None
        for batch, length in batches:
            started = self._dispatch(batch, length)
            if pending is not None:
                yield from self._collect(pending)
            pending = started
        if pending is not None:
            yield from self._collect(pending)

    def windows(self, windows: Iterable[Window]) -> Iterator[Scored]:
        """Each window's scores, in order, from batches of full-context windows (one compilation)."""
        def batches():
            batch: list[Window] = []
            for w in windows:
                batch.append(w)
                if len(batch) == self.batch_size:
                    yield batch, self.block_size
                    batch = []
            if batch:
                yield batch, self.block_size

        return self._pipelined(batches())

    def requests(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation given the context, whether it is the greedy continuation)
        for each (context ids, continuation ids); the context holds at least one id and the two together
        at most block_size + 1. Sorted by length and padded to powers of two: a few compilations."""
        windows = []
        for i, (ctx, cont) in enumerate(requests):
            seq = np.asarray(list(ctx) + list(cont), np.int32)
            windows.append(Window(i, seq[:-1], seq[1:], len(ctx) - 1, len(seq) - 1))
        windows.sort(key=lambda w: -len(w.x))
        batches = ((windows[i:i + self.batch_size], bucket(len(windows[i].x), self.block_size))
                   for i in range(0, len(windows), self.batch_size))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for s in self._pipelined(batches):
            out[s.tag] = (float(np.sum(s.logp, dtype=np.float64)), bool(np.all(s.greedy)))
        return out
