"""Mixtures: --data.mix and --data.mix_schedule parse or say what is wrong, each batch's rows come from the
sources in the weights' proportions, as a pure function of (seed, step), and a source that runs out is counted."""

import numpy as np
import pytest

from gptjax.data import mix
from gptjax.data.shards import Dataset
from gptjax.errors import UserError

MIX = "web=shards/web:0.7,code=corpora/c:d/*.py:0.2,books=books.txt:0.1"


def test_parse_mix_takes_the_weight_after_the_last_colon():
    sources = mix.parse_mix(MIX)
    assert [(s.name, s.spec, s.weight) for s in sources] == [
        ("web", "shards/web", 0.7), ("code", "corpora/c:d/*.py", 0.2), ("books", "books.txt", 0.1)]
    assert np.allclose(mix.weights_at(mix.parse_mix("a=x:3,b=y:1"), None, 0), [0.75, 0.25])  # relative weights


@pytest.mark.parametrize("text, says", [
    ("web=shards/web", "NAME=SOURCE:WEIGHT"),
    ("shards/web:0.7", "NAME=SOURCE:WEIGHT"),
    ("web=shards/web:lots", "not a number"),
    ("web=a:-1,code=b:1", "0 or more"),
    ("web=a:nan", "finite"),
    ("web=a:0,code=b:0", "sum to zero"),
    ("web=a:1,web=b:1", "twice"),
    ("we/b=a:1", "plain word"),
])
def test_bad_mix_says_what_is_wrong(text, says):
    with pytest.raises(UserError, match=says):
        mix.parse_mix(text)


def test_schedule_holds_from_its_step_on():
    sources = mix.parse_mix("web=a:0.7,code=b:0.3")
    schedule = mix.parse_schedule("5000:web=1,code=1; 0:web=0.7,code=0.3", ["web", "code"])
    assert schedule == ((0, (0.7, 0.3)), (5000, (1.0, 1.0)))
    assert np.allclose(mix.weights_at(sources, schedule, 4999), [0.7, 0.3])
    assert np.allclose(mix.weights_at(sources, schedule, 5000), [0.5, 0.5])
    assert mix.parse_schedule("0:web=1", ["web", "code"]) == ((0, (1.0, 0.0)),)  # a source left out: weight 0


@pytest.mark.parametrize("text, says", [
    ("0:web=0.5,news=0.5", "'news' is not a source"),
    ("100:web=1", "start with a stage at step 0"),
    ("0:web=1;x:web=1", "STEP:NAME=WEIGHT"),
    ("0:web", "not NAME=WEIGHT"),
    ("0:web=0,code=0", "sum to zero"),
    ("0:web=1;0:code=1", "twice"),
    ("0:web=-2", "0 or more"),
])
def test_bad_schedule_says_what_is_wrong(text, says):
    with pytest.raises(UserError, match=says):
        mix.parse_schedule(text, ["web", "code"])


def test_each_step_gives_a_source_the_floor_or_ceiling_of_its_share():
    w = mix.weights_at(mix.parse_mix(MIX), None, 0)
    for step in range(200):
        counts = np.bincount(mix.row_sources(w, 7, step, 8), minlength=3)
        assert counts.sum() == 8
        assert np.all(np.floor(w * 8) <= counts) and np.all(counts <= np.ceil(w * 8))


def test_proportions_hold_over_many_steps():
    # Per step a source's row count is floor(w n) or ceil(w n), a Bernoulli on the fraction with variance
    # p (1 - p) <= 1/4 row², independent across steps; over S steps the total's standard deviation is at
    # most sqrt(S) / 2 rows. Five of them: a correct draw fails this once in ~3 million runs, while a
    # fixed rounding (books' 0.8 row rounded up to 1 at every step, 12.5% instead of 10%) is off by 400.
    sources, steps, n = mix.parse_mix(MIX), 2000, 8
    drawn = mix.rows_drawn(sources, None, 0, n, steps)
    expected = mix.weights_at(sources, None, 0) * n * steps
    assert np.all(np.abs(drawn - expected) <= 5 * np.sqrt(steps) / 2), (drawn, expected)


def test_proportions_follow_the_schedule():
    sources = mix.parse_mix("web=a:1,code=b:1")
    schedule = mix.parse_schedule("0:web=0.9,code=0.1;500:web=0.2,code=0.8", ["web", "code"])
    before = mix.rows_drawn(sources, schedule, 3, 10, 500)
    assert np.all(np.abs(before - [4500, 500]) <= 5 * np.sqrt(500) / 2)
    both = mix.rows_drawn(sources, schedule, 3, 10, 1000)
    assert np.all(np.abs(both - before - [1000, 4000]) <= 5 * np.sqrt(500) / 2)


def _datasets():
    # source i holds only the id 10 + i, so every window says which source it came from
    return [Dataset(np.full(n, 10 + i, np.uint16), np.full(64, 10 + i, np.uint16))
            for i, n in enumerate((5000, 3000, 400))]


def test_a_batch_reads_each_row_from_its_source_and_repeats_exactly():
    datasets, w = _datasets(), mix.weights_at(mix.parse_mix(MIX), None, 0)
    x, y, which = mix.mixed_train_batch(datasets, w, 16, seed=5, step=42, grad_accum=2, batch_size=4)
    assert x.shape == y.shape == (2, 4, 16) and which.shape == (2, 4)
    assert np.all(x == (10 + which)[..., None]) and np.all(y == (10 + which)[..., None])
    again = mix.mixed_train_batch(datasets, w, 16, seed=5, step=42, grad_accum=2, batch_size=4)
    assert all(np.array_equal(a, b) for a, b in zip((x, y, which), again))  # (seed, step) decide: resume is exact
    seeds = {tuple(mix.row_sources(w, seed, 42, 8)) for seed in range(8)}
    assert len(seeds) > 1  # the seed moves the sources over the rows


def test_processes_reading_their_rows_see_the_global_batch():
    rng = np.random.default_rng(0)
    datasets = [Dataset(rng.integers(0, 500, n).astype(np.uint16), np.zeros(64, np.uint16)) for n in (5000, 3000, 400)]
    w = mix.weights_at(mix.parse_mix(MIX), None, 0)
    whole = mix.mixed_train_batch(datasets, w, 16, 1, 9, 2, 8)
    halves = [mix.mixed_train_batch(datasets, w, 16, 1, 9, 2, 8, rows=slice(k * 4, k * 4 + 4)) for k in (0, 1)]
    for part, got in enumerate(zip(*halves)):
        assert np.array_equal(np.concatenate(got, axis=1), whole[part])


def test_epochs_are_tokens_drawn_over_train_tokens_and_stop_says_which_source_ran_out():
    sources = mix.parse_mix(MIX)
    drawn = mix.rows_drawn(sources, None, 0, 8, 100)
    e = mix.epochs(drawn, 16, [1_000_000, 1_000_000, 400])
    assert np.allclose(e, drawn * 16 / np.array([1e6, 1e6, 400]))
    mix.check_exhausted(sources, e, "repeat")  # repeating is the default: counted, not refused
    with pytest.raises(UserError, match="'books'.*ran out.*on_exhausted=stop"):
        mix.check_exhausted(sources, e, "stop")
    mix.check_exhausted(sources, np.array([0.5, 0.5, 1.0]), "stop")  # exactly one epoch is not past the end


def test_the_mix_stands_alone_in_the_data_options():
    from gptjax.config import DataConfig

    with pytest.raises(UserError, match="cannot be used with --data.corpus or --data.dir"):
        DataConfig(mix="web=a:1", corpus="books.txt")
    with pytest.raises(UserError, match="cannot be used with --data.corpus or --data.dir"):
        DataConfig(mix="web=a:1", dir="shards/x")
    with pytest.raises(UserError, match="val_corpus cannot be used with --data.mix"):
        DataConfig(mix="web=a:1", val_corpus="held_out.txt")
    with pytest.raises(UserError, match="--data.mix, which is not given"):
        DataConfig(mix_schedule="0:web=1")
    cfg = DataConfig(mix="web=a:1,code=b:1", mix_schedule="0:web=1;10:code=1")
    assert mix.check(cfg) == (mix.parse_mix(cfg.mix), ((0, (1.0, 0.0)), (10, (0.0, 1.0))))
    with pytest.raises(UserError, match="'news' is not a source"):
        mix.check(DataConfig(mix="web=a:1", mix_schedule="0:news=1"))
    assert mix.check(DataConfig()) == ((), ())


def test_tokens_each_source_gives_follow_its_weight_across_a_schedule():
    # The batches' own tokens counted (each source's windows hold only its id): source i's tokens over S steps
    # of n rows of T tokens are T times its rows, whose deviation from w n S is at most sqrt(S) / 2 rows in
    # standard deviation (test_proportions_hold_over_many_steps); five of them is the tolerance, in tokens.
    datasets, sources = _datasets(), mix.parse_mix(MIX)
    schedule = mix.parse_schedule("0:web=0.5,code=0.4,books=0.1;150:web=0.1,code=0.1,books=0.8",
                                  [s.name for s in sources])
    steps, accum, rows, block = 300, 2, 4, 8
    counts, expected = np.zeros(3), np.zeros(3)
    for step in range(steps):
        w = mix.weights_at(sources, schedule, step)
        x, _, _ = mix.mixed_train_batch(datasets, w, block, seed=1, step=step, grad_accum=accum, batch_size=rows)
        counts += np.bincount(x.ravel() - 10, minlength=3)
        expected += w * accum * rows * block
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(steps) / 2 * block), (counts, expected)
