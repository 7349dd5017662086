"""--data.align=bos (gptjax.data.align): windows start at a document's start, the rest packed best-fit with
whole documents, what cannot fit dropped and counted; the batches a pure function of (seed, step)."""

import re

import numpy as np
import pytest

from gptjax.config import DataConfig
from gptjax.data import Dataset, align, mix
from gptjax.data.shards import TokenStream
from gptjax.errors import UserError
from gptjax.options import parse_args

EOT = 0


def corpus(lengths, seed=0):
    """Documents of the given lengths (their end-of-text included), ids 1.. (document i's tokens hold i + 1
    at their first place, so a piece says which document it came from)."""
    rng = np.random.default_rng(seed)
    docs = [np.r_[i + 1, rng.integers(1, 60000, n - 2), EOT] if n > 1 else np.r_[EOT] for i, n in enumerate(lengths)]
    return np.concatenate(docs).astype(np.uint16)


def check_windows(w: align.AlignedWindows, tokens: np.ndarray):
    """Every window is full and is a long document's window-sized piece, or pieces that each start at a
    document's start, all whole but the last (cut to the room) and long documents' first parts; the
    tokens in no window are `dropped`."""
    starts = np.r_[0, np.flatnonzero(tokens == EOT)[:-1] + 1]
    ends = np.r_[starts[1:], len(tokens)]
    heads = {int(s + (e - s) % w.window) for s, e in zip(starts, ends) if e - s > w.window}  # first parts' ends
    starts, ends = set(starts.tolist()), set(ends.tolist()) | heads
    for k in range(w.count):
        lo, hi = w.first[k], w.first[k + 1]
        assert w.lengths[lo:hi].sum() == w.window
        if hi - lo == 1 and w.lengths[lo] == w.window and int(w.starts[lo]) not in starts:
            continue  # a long document's piece
        for j in range(lo, hi):
            assert int(w.starts[j]) in starts, (k, j)  # a packed document is taken from its start
            if j < hi - 1:
                assert int(w.starts[j] + w.lengths[j]) in ends, (k, j)  # and whole, but for a cut tail
    assert w.count * w.window + w.dropped == len(tokens)


def test_a_handmade_corpus_packs_as_described_and_counts_what_it_drops():
    # window 8 (block_size 7): documents of 5, 3, 6, 2, 20, 4 and 7 tokens, at 0, 5, 8, 14, 16, 36 and 40
    tokens = corpus([5, 3, 6, 2, 20, 4, 7])
    w = align.build(TokenStream([tokens]), EOT, 7)
    check_windows(w, tokens)
    pieces = [list(zip(w.starts[lo:hi].tolist(), w.lengths[lo:hi].tolist())) for lo, hi in zip(w.first, w.first[1:])]
    # the 20 tokens are 4 packed as a document, then two windows of their own
    assert pieces[:2] == [[(20, 8)], [(28, 8)]]
    # 7 fits, then none of 2, 3, 4, 4, 5, 6 fits the 1 left: the shortest, 2, is cut to it (1 token dropped)
    assert pieces[2] == [(40, 7), (14, 1)]
    assert pieces[3] == [(8, 6), (5, 2)]  # 6, then the 3 cut to 2 (1 dropped)
    assert pieces[4] == [(0, 5), (16, 3)]  # 5, then the 20's first 4 cut to 3 (1 dropped)
    assert len(pieces) == 5  # the 4 left cannot fill a window: dropped
    assert w.dropped == 1 + 1 + 1 + 4 and w.documents == 7 and w.long_documents == 1 and w.long_windows == 2
    assert w.dropped_fraction == pytest.approx(7 / 47)
    assert "7 tokens (14.89%) dropped" in w.describe()
    assert "3 start at a document's start, packed best-fit, and 2 are pieces of the 1 documents" in w.describe()


def test_windows_start_at_documents_and_hold_them_whole_on_a_larger_corpus():
    rng = np.random.default_rng(3)
    tokens = corpus([int(n) for n in rng.integers(1, 90, 800)], seed=1)
    stream = TokenStream([tokens[:7000], tokens[7000:]])  # two shards read as one
    w = align.build(stream, EOT, 31, buffer=64)
    check_windows(w, tokens)
    assert w.count > 900 and w.long_documents > 100 and 0 < w.dropped < len(tokens) / 10
    for k in range(0, w.count, 97):
        lo = int(w.starts[w.first[k]])
        assert np.array_equal(w.read(k)[:w.lengths[w.first[k]]], tokens[lo:lo + w.lengths[w.first[k]]])


def test_the_same_seed_and_step_give_the_same_batch_and_processes_their_rows():
    tokens = corpus([int(n) for n in np.random.default_rng(4).integers(2, 40, 400)])
    w = align.build(TokenStream([tokens]), EOT, 15)
    x, y = align.train_batch(w, seed=3, step=5, grad_accum=2, batch_size=4)
    assert x.shape == y.shape == (2, 4, 15) and x.dtype == np.int32
    assert np.array_equal(x[..., 1:], y[..., :-1])
    again = align.train_batch(align.build(TokenStream([tokens]), EOT, 15), seed=3, step=5, grad_accum=2, batch_size=4)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])  # a rebuilt table: resume is exact
    assert not np.array_equal(x, align.train_batch(w, 3, 6, 2, 4)[0])
    assert not np.array_equal(x, align.train_batch(w, 4, 5, 2, 4)[0])
    halves = [align.train_batch(w, 3, 5, 2, 4, rows=slice(k * 2, k * 2 + 2))[0] for k in (0, 1)]
    assert np.array_equal(np.concatenate(halves, axis=1), x)
    table = [w.read(k) for k in range(w.count)]
    for row, target in zip(x.reshape(-1, 15), y.reshape(-1, 15)):  # each row is one of the table's windows
        assert any(np.array_equal(np.r_[row, target[-1]], t) for t in table)


def test_a_mixture_draws_aligned_windows_from_each_source():
    datasets = [Dataset(corpus([int(n) for n in np.random.default_rng(i).integers(2, 30, 300)]),
                        np.zeros(64, np.uint16)) for i in range(2)]
    aligned = [align.build(d.train, EOT, 15) for d in datasets]
    w = mix.weights_at(mix.parse_mix("a=x:0.5,b=y:0.5"), None, 0)
    x, y, which = mix.mixed_train_batch(datasets, w, 15, 1, 2, 2, 4, aligned=aligned)
    again = mix.mixed_train_batch(datasets, w, 15, 1, 2, 2, 4, aligned=aligned)
    assert all(np.array_equal(a, b) for a, b in zip((x, y, which), again))
    for idx in np.ndindex(which.shape):
        src = aligned[which[idx]]
        assert any(np.array_equal(np.r_[x[idx], y[idx][-1]], src.read(k)) for k in range(src.count))


def test_the_option_and_its_refusals():
    assert DataConfig().align == "none"
    assert parse_args(["--config=", "--data.align=bos", "--data.doc_mask=true"]).data.align == "bos"
    with pytest.raises(UserError, match=re.escape("--data.align must be one of 'none', 'bos'; got 'eos'.")):
        parse_args(["--config=", "--data.align=eos"])
    with pytest.raises(UserError, match="no whole window of 33 tokens"):
        align.of_split(TokenStream([corpus([5, 5])]), EOT, 32, "train", print)
