"""A mixture of sources: their weights, a schedule of weights, and which source each row of a batch reads.

`--data.mix='web=shards/web:0.7,code=shards/code:0.3'` names the sources; the weight is what follows
the last `:`, so a source (a folder, a file or a glob) may hold `:` but not `,`. Weights are relative.
`--data.mix_schedule='0:web=0.7,code=0.3;5000:web=0.5,code=0.5'` changes them at given steps.

The draw. Each row of step `step`'s global batch is assigned to a source by systematic sampling:
one uniform `u` from (seed, step), row k's point is (u + k) / rows, read through the cumulative
weights. A source of weight w then gets floor(w * rows) or ceil(w * rows) rows at every step, its
expected count is exactly w * rows (no rounding bias towards small sources, as a fixed rounded
allocation would have), and the deviations of different steps are independent, so over many steps
the shares converge to the weights. A permutation from (seed, step) then spreads the sources over
the rows, so a process reading only its rows sees every source, and each source's windows are drawn
from that source with the usual `batch_offsets` (a stream of its own per source). Everything is a
pure function of (seed, step, weights): exact resume, every parallel layout and every process agree.
No JAX here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gptjax.data.shards import batch_offsets
from gptjax.errors import UserError

MIX_STREAM = 2  # the rng stream of the row assignment (0 and 1 are the train and val windows)


@dataclass(frozen=True)
class Source:
    name: str
    spec: str
    weight: float


def _weight(text: str, where: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise UserError(f"{where}: the weight {text!r} is not a number; write e.g. web=shards/web:0.7.") from None
    if not math.isfinite(w) or w < 0:
        raise UserError(f"{where}: the weight {text!r} must be a finite number, 0 or more.")
    return w


def _check_total(weights, where: str) -> None:
    if sum(weights) <= 0:
        raise UserError(f"{where}: the weights sum to zero; give at least one source a weight above 0.")


def parse_mix(text: str) -> tuple[Source, ...]:
    """`NAME=SOURCE:WEIGHT,...` as Sources, or a UserError that says which entry is wrong."""
    sources, seen = [], set()
    for entry in (e.strip() for e in text.split(",")):
        where = f"--data.mix entry {entry!r}"
        name, eq, rest = entry.partition("=")
        spec, colon, weight = rest.rpartition(":")
        if not (eq and colon and name.strip() and spec.strip()):
            raise UserError(f"{where} is not NAME=SOURCE:WEIGHT, e.g. --data.mix='web=shards/web:0.7,"
                            f"code=corpora/code:0.3' (a source cannot contain ',').")
        name = name.strip()
        if name in seen:
            raise UserError(f"--data.mix names the source {name!r} twice; each source needs a name of its own.")
        if "/" in name or name.startswith("."):
            raise UserError(f"{where}: the name {name!r} must be a plain word (it names <out_dir>/data/{name}).")
        seen.add(name)
        sources.append(Source(name, spec.strip(), _weight(weight.strip(), where)))
    _check_total([s.weight for s in sources], "--data.mix")
    return tuple(sources)


def parse_schedule(text: str, names: list[str]) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """`STEP:NAME=WEIGHT,...;...` as (step, weights in `names`' order) sorted by step.

    A source a stage leaves out has weight 0 in it; the first stage must start at step 0.
    """
    stages = {}
    for part in (p.strip() for p in text.split(";") if p.strip()):
        where = f"--data.mix_schedule stage {part!r}"
        step, colon, body = part.partition(":")
        if not colon or not step.strip().isdigit():
            raise UserError(f"{where} is not STEP:NAME=WEIGHT,..., e.g. '0:web=0.7,code=0.3;5000:web=0.5,code=0.5'.")
        weights = dict.fromkeys(names, 0.0)
        for item in (i.strip() for i in body.split(",")):
            name, eq, w = item.partition("=")
            if not eq:
                raise UserError(f"{where}: {item!r} is not NAME=WEIGHT.")
            if name.strip() not in weights:
                raise UserError(f"{where}: {name.strip()!r} is not a source of --data.mix; the sources are "
                                f"{', '.join(names)}.")
            weights[name.strip()] = _weight(w.strip(), where)
        _check_total(weights.values(), where)
        if int(step) in stages:
            raise UserError(f"--data.mix_schedule gives step {int(step)} twice.")
        stages[int(step)] = tuple(weights[n] for n in names)
    if not stages or min(stages) != 0:
        raise UserError("--data.mix_schedule must start with a stage at step 0, e.g. '0:web=0.7,code=0.3;...'.")
    return tuple(sorted(stages.items()))


def weights_at(sources: tuple[Source, ...], schedule, step: int) -> np.ndarray:
    """The normalized weights in force at `step`: the last stage at or before it, else the mix's own."""
    weights = [s.weight for s in sources]
    for start, stage in schedule or ():
        if start <= step:
            weights = stage
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def row_sources(weights: np.ndarray, seed: int, step: int, count: int) -> np.ndarray:
    """The source index of each of the `count` rows of step `step` (see the module's docstring)."""
    rng = np.random.default_rng([seed, MIX_STREAM, step])
    points = (rng.random() + np.arange(count)) / count
    edges = np.cumsum(weights)
    edges[-1] = 1.0  # no point past the last edge through rounding
    which = np.searchsorted(edges, points, side="right")
    return rng.permutation(np.minimum(which, len(weights) - 1))


def rows_drawn(sources, schedule, seed: int, count: int, steps: int) -> np.ndarray:
    """Rows each source contributed over steps 0 .. steps-1 (times block_size: its tokens drawn)."""
    total = np.zeros(len(sources), dtype=np.int64)
    for step in range(steps):
        total += np.bincount(row_sources(weights_at(sources, schedule, step), seed, step, count),
                             minlength=len(sources))
    return total


def epochs(rows: np.ndarray, block_size: int, train_tokens) -> np.ndarray:
    """Epochs of each source read so far: tokens drawn / its train tokens."""
    return rows * block_size / np.asarray(train_tokens, dtype=np.float64)


def check_exhausted(sources, epochs_now: np.ndarray, on_exhausted: str) -> None:
    """With on_exhausted=stop, a source read past its end stops the run with a message."""
    if on_exhausted != "stop":
        return
    for source, e in zip(sources, epochs_now):
        if e > 1.0:
            raise UserError(f"the source {source.name!r} ({source.spec}) ran out: {e:.2f} epochs of it drawn, and "
                            f"--data.on_exhausted=stop. Give it more text, a smaller weight, fewer steps, or "
                            f"--data.on_exhausted=repeat.")


def mixed_offsets(counts, seed: int, which: np.ndarray, step: int) -> np.ndarray:
    """Each row's draw from [0, counts[i]) of its own source i, from a stream of its own: a window's start
    (counts: size - block_size), or with --data.align an aligned window's index (counts: the windows)."""
    offsets = np.zeros(len(which), dtype=np.int64)
    for i, count in enumerate(counts):
        mine = np.flatnonzero(which == i)
        if len(mine):
            offsets[mine] = batch_offsets(count, 0, seed, MIX_STREAM + 1 + i, step, len(mine))
    return offsets


def mixed_train_batch(datasets, weights: np.ndarray, block_size: int, seed: int, step: int, grad_accum: int,
                      batch_size: int, rows: slice = slice(None), aligned=None):
    """Step `step`'s global batch drawn from the sources: (inputs, targets, each row's source index).

    Shapes as `train_batch`'s, the source index (grad_accum, batch_size[rows]); `rows` reads only those rows.
    `aligned`: each source's gptjax.data.align.AlignedWindows (--data.align=bos), drawn instead of offsets.
    """
    which = row_sources(weights, seed, step, grad_accum * batch_size)
    counts = [w.count for w in aligned] if aligned else [d.train.size - block_size for d in datasets]
    offsets = mixed_offsets(counts, seed, which, step)
    which, offsets = (a.reshape(grad_accum, batch_size)[:, rows] for a in (which, offsets))
    window = np.empty((*offsets.shape, block_size + 1), dtype=np.int32)
    for idx in np.ndindex(offsets.shape):
        i, at = int(which[idx]), int(offsets[idx])
        window[idx] = aligned[i].read(at) if aligned else datasets[i].train.window(at, block_size + 1)
    return window[..., :-1], window[..., 1:], which


def check(data_cfg) -> tuple[tuple[Source, ...], tuple]:
    """A run's --data.mix and --data.mix_schedule parsed (a UserError if either is wrong): (sources, schedule)."""
    if not data_cfg.mix:
        return (), ()
    sources = parse_mix(data_cfg.mix)
    schedule = parse_schedule(data_cfg.mix_schedule, [s.name for s in sources]) if data_cfg.mix_schedule else ()
    return sources, schedule
