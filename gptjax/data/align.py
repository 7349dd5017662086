"""Training windows that start at a document's start (--data.align=bos): a table built once per split from
its end-of-text positions, then drawn by (seed, step) as the stream's windows are.

A window holds `block_size + 1` tokens (the inputs and, shifted by one, their targets). Each window is
made of pieces (start, length) of the token stream:
- its first piece starts at a document's start (the stream's first token, or the one after an
  end-of-text), and so does every later piece;
- the rest of the room is filled by best-fit packing: among the documents in a buffer of the next
  `BUFFER` ones, in the stream's order, the largest that fits the room left is taken whole;
- when none fits, the shortest in the buffer is cut to the room, and the rest of it is DROPPED. A
  padded tail would cost the same compute as text and, with no loss mask, would teach the model to
  predict padding; the cut tail is real text from a document's start, and what it drops is counted;
- a document longer than a window is cut into pieces: its first (length mod window) tokens, packed as
  a document is, then window-sized pieces, each a window of its own (these start mid-document: the one
  exception to the rule above);
- the last window, when the documents run out before it is full, is dropped too.
The table depends on the tokens and block_size alone, so every process, every parallel layout and a
resumed run build the same one; a step's windows are indices into it drawn from (seed, step), with
replacement, by `batch_offsets` as the stream's offsets are. No JAX here.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from gptjax.data.shards import TRAIN_STREAM, TokenStream, batch_offsets
from gptjax.errors import UserError

BUFFER = 1000  # documents the best fit chooses among
SCAN = 1 << 24  # tokens read at a time when finding the ends of documents


@dataclass
class AlignedWindows:
    """The windows of one split: window k is pieces first[k] .. first[k + 1] - 1 of (starts, lengths)."""

    tokens: TokenStream
    window: int  # tokens per window: block_size + 1
    starts: np.ndarray  # int64, a piece's first token in the stream
    lengths: np.ndarray  # int64
    first: np.ndarray  # int64, len = windows + 1
    documents: int  # documents in the split
    long_documents: int  # of them, those longer than a window, cut into pieces
    long_windows: int  # windows that are one window-sized piece of a long document (the rest start at one)
    dropped: int  # tokens in no window: the cut documents' rests and the last window, if it is not full

    @property
    def count(self) -> int:
        return len(self.first) - 1

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / max(self.tokens.size, 1)

    def read(self, index: int) -> np.ndarray:
        """Window `index`: its pieces end to end, `window` tokens."""
        lo, hi = int(self.first[index]), int(self.first[index + 1])
        return np.concatenate([self.tokens.window(int(s), int(n)) for s, n in
                               zip(self.starts[lo:hi], self.lengths[lo:hi])])

    def batch(self, indices: np.ndarray):
        """Inputs and next-token targets (int32) of the windows at `indices`, shaped like it + (T,)."""
        flat = np.stack([self.read(int(i)).astype(np.int32) for i in indices.reshape(-1)])
        flat = flat.reshape(*indices.shape, self.window)
        return flat[..., :-1], flat[..., 1:]

    def describe(self, name: str = "train") -> str:
        return (f"data: --data.align=bos: {self.count:,} {name} windows of {self.window - 1} tokens from "
                f"{self.documents:,} documents: {self.count - self.long_windows:,} start at a document's start, "
                f"packed best-fit, and {self.long_windows:,} are pieces of the {self.long_documents:,} documents "
                f"longer than a window; {self.dropped:,} tokens "
                f"({100 * self.dropped_fraction:.2f}%) dropped: the rest of each document cut to fill a window's "
                "tail, and the window left unfilled at the split's end")


def train_batch(windows: AlignedWindows, seed: int, step: int, grad_accum: int, batch_size: int,
                rows: slice = slice(None)):
    """Step `step`'s global batch of aligned windows, as shards.train_batch shapes it (its `rows` only)."""
    picked = batch_offsets(windows.count, 0, seed, TRAIN_STREAM, step, grad_accum * batch_size)
    return windows.batch(picked.reshape(grad_accum, batch_size)[:, rows])


def document_bounds(tokens: TokenStream, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's (start, end): it ends after its end-of-text, or at the stream's end."""
    ends, at = [], 0
    for part in tokens.parts:
        for lo in range(0, len(part), SCAN):
            ends.append(at + lo + 1 + np.flatnonzero(np.asarray(part[lo:lo + SCAN]) == eot_id))
        at += len(part)
    end = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if tokens.size and (not len(end) or end[-1] != tokens.size):
        end = np.append(end, tokens.size)
    return np.concatenate([[0], end[:-1]]).astype(np.int64), end.astype(np.int64)


def build(tokens: TokenStream, eot_id: int, block_size: int, buffer: int = BUFFER) -> AlignedWindows:
    """The aligned windows of a split (see the module's docstring)."""
    doc_start, doc_end = document_bounds(tokens, eot_id)
    width = block_size + 1
    starts, lengths, first = [], [], [0]
    pool: list[tuple[int, int, int]] = []  # (length, order, start), sorted: the buffer
    whole: deque = deque()  # long documents' window-sized pieces, each a window of its own
    dropped, order, nxt, long_docs, long_windows = 0, 0, 0, 0, 0

    def refill() -> None:
        nonlocal nxt, order, long_docs
        while len(pool) < buffer and nxt < len(doc_start):
            s, n = int(doc_start[nxt]), int(doc_end[nxt] - doc_start[nxt])
            nxt += 1
            if n > width:  # its first n mod width tokens are packed as a document; the rest are whole windows
                long_docs += 1
                s, n, head = s + n % width, n - n % width, n % width
                whole.extend(range(s, s + n, width))
                if not head:
                    continue
                s, n = s - head, head
            bisect.insort(pool, (n, order, s))
            order += 1

    while True:
        refill()
        if whole:
            starts.append(whole.popleft())
            lengths.append(width)
            first.append(len(starts))
            long_windows += 1
            continue
        if not pool:
            break
        room = width
        while room:
            refill()
            if not pool:
                break
            k = bisect.bisect_right(pool, (room, order, 0)) - 1  # the largest that fits
            n, _, s = pool.pop(max(k, 0))
            if k < 0:  # none fits: the shortest is cut to the room, its rest dropped
                dropped += n - room
                n = room
            starts.append(s)
            lengths.append(n)
            room -= n
        if room:  # the documents ran out before this window was full: it is dropped
            dropped += width - room
            del starts[first[-1]:], lengths[first[-1]:]
        else:
            first.append(len(starts))
    return AlignedWindows(tokens, width, np.asarray(starts, np.int64), np.asarray(lengths, np.int64),
                          np.asarray(first, np.int64), len(doc_start), long_docs, long_windows, dropped)


def of_split(tokens: TokenStream, eot_id: int, block_size: int, name: str, log) -> AlignedWindows:
    """The aligned windows of a run's split, logged once (what is dropped, and the time the table took)."""
    started = time.time()
    windows = build(tokens, eot_id, block_size)
    if not windows.count:
        raise UserError(f"--data.align=bos finds no whole window of {block_size + 1} tokens in the {name} split "
                        f"({tokens.size:,} tokens): use a larger corpus or a smaller --model.block_size.")
    log(f"{windows.describe(name)} (table built in {time.time() - started:.1f} s)")
    return windows
