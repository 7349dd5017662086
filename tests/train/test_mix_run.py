"""A run given --data.mix: its mistakes are told before anything is prepared, compiled or written; a mixture of
two tiny corpora trains, reports each source's validation, resumes exactly across a schedule change, and stops
with on_exhausted=stop when a source runs out."""

import dataclasses
import json
import os

import pytest

from conftest import make_corpus, tiny_config
from gptjax.config import DataConfig
from gptjax.errors import UserError
from gptjax.train.setup import set_up
from gptjax.train.trainer import train


def quiet(*_):
    pass


@pytest.mark.parametrize("mix_, schedule, says", [
    ("web=a:1,code=b:x", "", "not a number"),
    ("web=a:1,code=b:-1", "", "0 or more"),
    ("web=a:0,code=b:0", "", "sum to zero"),
    ("web=a:1,web=b:1", "", "twice"),
    ("web=a:1,code=b:1", "0:web=1,news=1", "'news' is not a source"),
])
def test_a_mixed_run_is_refused_before_anything_is_prepared(tmp_path, mix_, schedule, says):
    cfg = tiny_config(tmp_path / "run", "")
    cfg = dataclasses.replace(cfg, data=DataConfig(mix=mix_, mix_schedule=schedule, tokenizer="byte"))
    with pytest.raises(UserError, match=says):
        set_up(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_the_command_line_exits_2_on_a_bad_weight_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    run = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--out_dir={tmp_path / 'run'}",
                          "--data.mix=web=a:1,code=b:lots"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "'lots' is not a number" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists()


def _prose(path, n_docs=30):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (path / f"doc{i:03d}.txt").write_text("".join(f"The {w} number {i} sat on mat {j}.\n"
                                                      for j, w in enumerate(["cat", "dog", "owl"] * 4)))
    return path


def mix_config(root, out, **train_):
    cfg = tiny_config(root / out, "", **train_)
    mix_ = f"code={root / 'code'}:0.7,prose={root / 'prose'}:0.3"
    return dataclasses.replace(cfg, data=DataConfig(mix=mix_, mix_schedule="0:code=0.7,prose=0.3;6:code=0.2,prose=0.8",
                                                    tokenizer="byte", val_fraction=0.1))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    make_corpus(root / "code")
    _prose(root / "prose")
    shown = []
    full = train(mix_config(root, "full"), log=shown.append)
    (root / "full.log").write_text("\n".join(shown) + "\n")
    part = train(mix_config(root, "part"), log=quiet, stop_after=4)
    rest = train(mix_config(root, "part", resume=True), log=quiet)
    return root, full, part, rest


def test_a_mixture_trains_and_reports_each_source(mixed):
    root, full, _, _ = mixed
    assert (root / "full" / "data" / "code" / "meta.json").is_file()
    assert (root / "full" / "data" / "prose" / "meta.json").is_file()
    records = [json.loads(line) for line in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    for r in evals:
        assert r["val_bpb/code"] > 0 and r["val_bpb/prose"] > 0
        low, high = sorted([r["val_bpb/code"], r["val_bpb/prose"]])
        assert low <= r["val_bpb"] <= high  # weight-averaged
    steps = [r for r in records if "loss" in r and "val_loss" not in r]
    assert all(r["epochs/code"] > 0 and r["epochs/prose"] > 0 for r in steps)
    assert steps[-1]["epochs/prose"] > steps[0]["epochs/prose"]


def test_the_progress_line_shows_each_sources_epochs(mixed):
    root = mixed[0]
    steps = {r["step"]: r for r in map(json.loads, (root / "full" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r and "val_loss" not in r}
    lines = [line for line in (root / "full.log").read_text().splitlines() if " tok/s " in line]
    assert len(lines) == len(steps) == 4, lines
    for line in lines:
        r = steps[int(line.split()[1])]
        assert line.endswith(f" | epochs code {r['epochs/code']:.2f} prose {r['epochs/prose']:.2f}"), line


def test_a_mixture_resumes_exactly_across_a_schedule_change(mixed):
    _, full, part, rest = mixed
    assert sorted(part["loss"]) == [1, 2, 3, 4]
    for s in range(1, 13):
        assert (part["loss"] | rest["loss"])[s] == full["loss"][s], s  # bit for bit on the CPU
    assert rest["val_loss"][12] == full["val_loss"][12]
    root = mixed[0]
    last = [[r for r in map(json.loads, (root / run / "metrics.jsonl").read_text().splitlines())
             if "epochs/code" in r][-1] for run in ("full", "part")]
    assert last[0] == {**last[1], "tokens_per_s": last[0]["tokens_per_s"], "elapsed_s": last[0]["elapsed_s"],
                       "mfu": last[0]["mfu"]}  # the epochs counted on from the checkpoint's rows


def test_a_checkpoint_holds_the_rows_each_source_gave(mixed):
    from gptjax.data import mix
    from gptjax.weights.checkpoint import read_meta

    root = mixed[0]
    meta = read_meta(root / "part" / "checkpoints", 4)
    sources = mix.parse_mix("code=a:0.7,prose=b:0.3")
    schedule = mix.parse_schedule("0:code=0.7,prose=0.3;6:code=0.2,prose=0.8", ["code", "prose"])
    assert list(meta["mix_rows"].values()) == list(mix.rows_drawn(sources, schedule, 0, 8, 4))


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


def test_a_prepared_source_of_another_tokenizer_is_refused(mixed, tmp_path):
    root = mixed[0]
    cfg = mix_config(root, "other")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, tokenizer="gpt2", mix=f"code={root / 'full' / 'data' / 'code'}:1,prose={root / 'prose'}:1",
        mix_schedule=""))
    before = _tree(root)
    with pytest.raises(UserError, match="byte tokenizer, but this run uses gpt2"):
        set_up(cfg, log=quiet)
    assert _tree(root) == before


def test_a_prepared_source_without_validation_is_refused(mixed, tmp_path):
    root = mixed[0]
    shards = tmp_path / "noval"
    shards.mkdir()
    meta = json.loads((root / "full" / "data" / "code" / "meta.json").read_text())
    (shards / "meta.json").write_text(json.dumps({**meta, "val_tokens": 0}))
    cfg = mix_config(root, "noval")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mix=f"a={shards}:1,prose={root / 'prose'}:1",
                                                            mix_schedule=""))
    before = _tree(root)
    with pytest.raises(UserError, match="no validation split"):
        set_up(cfg, log=quiet)
    assert _tree(root) == before


def test_on_exhausted_stop_stops_with_a_checkpoint(mixed):
    root = mixed[0]
    cfg = mix_config(root, "stop", max_steps=400, eval_interval=1000, ckpt_interval=1000, log_interval=50)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_exhausted="stop"))
    with pytest.raises(UserError, match="ran out.*on_exhausted=stop.*checkpoint of step") as e:
        train(cfg, log=quiet)
    step = int(str(e.value).split("checkpoint of step ")[1].split()[0])
    assert 0 < step < 400
    assert os.path.isdir(root / "stop" / "checkpoints" / str(step))


def test_the_plot_draws_each_source(mixed, tmp_path):
    import importlib.util

    from gptjax.train import plot

    root = mixed[0]
    _, val = plot.read_metrics(root / "full")
    assert plot.source_names(val, "val_bpb") == ["code", "prose"]
    assert plot.task_accuracies(val) == []  # a source's figures are not a task's
    if importlib.util.find_spec("matplotlib"):
        assert plot.plot([root / "full"], tmp_path / "loss.png").stat().st_size > 0


def test_the_command_line_exits_2_on_a_source_of_another_tokenizer_and_writes_nothing(mixed, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    root = mixed[0]
    before = _tree(root)
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--out_dir={tmp_path / 'run'}",
                          "--data.tokenizer=gpt2", f"--data.mix=code={root / 'full' / 'data' / 'code'}:1,"
                          f"prose={root / 'prose'}:1"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "a mixture has one tokenizer" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists() and _tree(root) == before


def test_fsdp_draws_the_same_mixed_batches(mixed):
    # the same global batch in another layout: losses to float32 reduction order (tests/train/test_layouts.py)
    import jax
    import numpy as np

    root, full = mixed[0], mixed[1]
    if jax.device_count() < 2:
        pytest.skip("one device: no other layout to compare")
    fsdp = train(mix_config(root, "fsdp", parallel="fsdp"), log=quiet, stop_after=4)
    np.testing.assert_allclose([fsdp["loss"][s] for s in range(1, 5)], [full["loss"][s] for s in range(1, 5)],
                               rtol=1e-6)


def test_tensorboard_holds_each_sources_figures(mixed):
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("tensorboardX", "tensorboard")):
        pytest.skip('TensorBoard events need pip install "gptjax[tb]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(mixed[0] / "full" / "tensorboard"))
    events.Reload()
    assert {"val_bpb/code", "val_bpb/prose", "val_loss/code", "epochs/prose"} <= set(events.Tags()["scalars"])


def test_a_fine_tune_trains_on_a_mixture(mixed):
    """--train.init_from with --data.mix: the source's weights, tokenizer and shape, then the mixture's batches.
    At step 0 each source's validation is the source run's last (the same splits, batches and weights)."""
    root = mixed[0]
    cfg = mix_config(root, "tuned", init_from=str(root / "full"), max_steps=3, eval_interval=3, ckpt_interval=3)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=1, n_embd=16))  # the source's wins
    tuned = train(cfg, log=quiet)
    assert sorted(tuned["loss"]) == [1, 2, 3]
    evals = {run: {r["step"]: r for r in map(json.loads, (root / run / "metrics.jsonl").read_text().splitlines())
                   if "val_loss" in r} for run in ("full", "tuned")}
    for name in ("code", "prose"):
        assert evals["tuned"][0][f"val_loss/{name}"] == evals["full"][12][f"val_loss/{name}"]
    assert evals["tuned"][3]["val_loss/code"] < evals["tuned"][0]["val_loss/code"]


def test_a_fine_tune_refuses_a_prepared_source_of_another_tokenizer_than_its_source(mixed, tmp_path):
    root = mixed[0]
    shards = tmp_path / "gpt2_shards"
    shards.mkdir()
    meta = json.loads((root / "full" / "data" / "code" / "meta.json").read_text())
    (shards / "meta.json").write_text(json.dumps({**meta, "tokenizer": "gpt2"}))
    cfg = mix_config(root, "tuned_gpt2", init_from=str(root / "full"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="gpt2", mix_schedule="",
                                                            mix=f"code={shards}:1,prose={root / 'prose'}:1"))
    before = _tree(root)
    with pytest.raises(UserError, match=r"gpt2 tokenizer, but this run uses byte, the tokenizer of the model it "
                                         r"starts from \(--train.init_from\)") as e:
        set_up(cfg, log=quiet)
    assert "Prepare it again with --data.tokenizer=byte" in str(e.value)
    assert _tree(root) == before


def test_a_fine_tune_refuses_a_prepared_source_of_another_learned_bpe(mixed, tmp_path):
    """A learned bpe is the source model's: a prepared source whose bpe was learned apart is refused before anything
    is prepared, and a mixture of corpora is tokenized with the source's bpe (none learned for it)."""
    from gptjax.data.pipeline import prepare

    root = mixed[0]
    bpe = DataConfig(corpus=str(root / "prose"), tokenizer="bpe", bpe_vocab=512, val_fraction=0.1)
    source = tiny_config(tmp_path / "source", str(root / "prose"), max_steps=1, eval_interval=1, ckpt_interval=1)
    train(dataclasses.replace(source, data=bpe), log=quiet)
    prepare(dataclasses.replace(bpe, corpus=str(root / "code")), tmp_path / "code_bpe", log=quiet)  # learned apart
    cfg = mix_config(root, "tuned_bpe", init_from=str(tmp_path / "source"), max_steps=1, eval_interval=1,
                     ckpt_interval=1)
    apart = f"code={tmp_path / 'code_bpe'}:1,prose={root / 'prose'}:1"
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mix_schedule="", mix=apart))
    with pytest.raises(UserError, match="another learned bpe tokenizer than the fine-tune's source"):
        set_up(cfg, log=quiet)
    assert not (root / "tuned_bpe" / "data" / "prose").exists()
    corpora = f"code={root / 'code'}:1,prose={root / 'prose'}:1"
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mix=corpora))
    train(cfg, log=quiet)
    source_tokens = (tmp_path / "source" / "data" / "tokenizer.tiktoken").read_text()
    assert (root / "tuned_bpe" / "data" / "code" / "tokenizer.tiktoken").read_text() == source_tokens
    assert not (root / "tuned_bpe" / "data" / "mix-tokenizer.json").exists()


def test_an_aligned_mixture_trains_and_resumes_exactly(mixed):
    """--data.align=bos with a mixture: each source's own table, told once each, drawn from (seed, step)."""
    root = mixed[0]

    def config(out, **train_):
        cfg = mix_config(root, out, max_steps=4, eval_interval=4, ckpt_interval=2, **train_)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, align="bos", doc_mask=True))

    lines = []
    full = train(config("aligned"), log=lines.append)
    told = [line for line in lines if "--data.align=bos" in line]
    assert len(told) == 2 and "code train windows" in told[0] and "prose train windows" in told[1], lines
    part = train(config("aligned-part"), log=quiet, stop_after=2)
    rest = train(config("aligned-part", resume=True), log=quiet)
    for s in range(1, 5):
        assert (part["loss"] | rest["loss"])[s] == full["loss"][s], s
