"""--data.doc_mask and --data.doc_positions in a run: the options and their refusals, and a doc-mask run
that trains, checkpoints, resumes exactly and loads into a model that scores as the run validated (and
one whose windows start at documents, --data.align=bos; the table's own tests: tests/data/test_align.py).
The model's side (a packed document computes what it computes alone) is tests/model/test_documents.py."""

import dataclasses
import re

import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from gptjax import data as data_lib
from gptjax import load
from gptjax.config import Config, DataConfig
from gptjax.errors import UserError
from gptjax.model.documents import Documents
from gptjax.model.gpt import abstract
from gptjax.options import from_dict, parse_args, to_dict
from gptjax.train.trainer import train


def quiet(_):
    pass


def short_docs(path, n_docs=60):
    """Documents of 10 to 30 bytes, so that most 32-byte windows hold end-of-text tokens."""
    path.mkdir(parents=True)
    for i in range(n_docs):
        (path / f"d{i:03d}.txt").write_text(f"x{i} = {i % 7} + y\n" * (1 + i % 3))
    return path


def test_options_and_their_refusals():
    cfg = parse_args(["--config=", "--data.doc_mask=true", "--data.doc_positions=restart"])
    assert (cfg.data.doc_mask, cfg.data.doc_positions) == (True, "restart")
    assert from_dict(Config, to_dict(cfg)) == cfg  # config.toml round trip
    assert (Config().data.doc_mask, Config().data.doc_positions) == (False, "continue")
    with pytest.raises(UserError, match=re.escape(
            "--data.doc_positions must be one of 'continue', 'restart'; got 'foo'.")):
        parse_args(["--config=", "--data.doc_mask=true", "--data.doc_positions=foo"])
    # restarting positions where attention runs on across documents is refused, not quietly half-done
    with pytest.raises(UserError, match="doc_positions=restart.*--data.doc_mask=true"):
        parse_args(["--config=", "--data.doc_positions=restart"])
    with pytest.raises(UserError, match="doc_positions=restart"):
        DataConfig(doc_positions="restart")


def test_a_doc_mask_run_trains_resumes_and_loads(tmp_path):
    corpus = short_docs(tmp_path / "corpus")

    def config(out, **train_kw):
        cfg = tiny_config(tmp_path / out, corpus, max_steps=8, eval_interval=4, ckpt_interval=4, **train_kw)
        # scanned layers, rematerialised blocks and a chunked loss take the mask through every path
        return dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, doc_mask=True, doc_positions="restart"),
            model=dataclasses.replace(cfg.model, scan_layers=True), train=dataclasses.replace(
                cfg.train, remat="block", loss_chunk=64))

    full = train(config("full"), log=quiet)
    assert full["val_loss"][8] < full["val_loss"][0] - 0.5
    part = train(config("part"), log=quiet, stop_after=4)
    rest = train(config("part", resume=True), log=quiet)
    for s in range(1, 9):
        assert (part["loss"] | rest["loss"])[s] == full["loss"][s], s  # bit for bit on the CPU
    assert rest["val_loss"][8] == full["val_loss"][8]

    model = load(tmp_path / "full")
    assert model.config.data.doc_mask and model.model.docs == Documents(eot_id=256, restart=True)
    # the loaded model scores the validation batches as the run's evaluation did (float32 sums over 4
    # devices there, over one here), and not as a model without the mask would
    cfg = config("full")
    ds = data_lib.load(cfg.data, tmp_path / "full" / "data", log=quiet)
    batches = [data_lib.val_batch(ds, 32, cfg.train.seed, i, 8) for i in range(cfg.train.eval_batches)]
    assert sum(int((x == 256).sum()) for x, _ in batches) > 10  # the windows do hold documents' ends
    val = np.mean([-float(model.model.token_logprobs(x, y)[0].mean()) for x, y in batches])
    assert val == pytest.approx(full["val_loss"][8], rel=1e-5)
    unmasked = nnx.merge(abstract(model.config.model)[0], model.params)
    causal = np.mean([-float(unmasked.token_logprobs(x, y)[0].mean()) for x, y in batches])
    assert abs(causal - val) > 1e-3
    # sampling decodes with the documents' cache (tests/model/test_documents.py checks its logits)
    assert isinstance(model.generate("x1 = ", max_new_tokens=4, temperature=0), str)


def test_fsdp_with_heads_split_trains_as_pmap(tmp_path):
    """The mask is built from each row's own tokens: sharding the batch and splitting the heads over a
    (data 2, model 2) mesh changes only the order of float32 sums: rtol 1e-6, about 8 ulps, for the reasons
    tests/train/test_layouts.py gives (a wrong row moves these losses by 4e-4 or more)."""
    corpus = short_docs(tmp_path / "corpus")
    runs = {}
    for name, kw in {"pmap": {}, "fsdp": dict(parallel="fsdp", mesh="data:2,model:2")}.items():
        cfg = tiny_config(tmp_path / name, corpus, max_steps=4, eval_interval=4, **kw)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, doc_mask=True))
        runs[name] = train(cfg, log=quiet)
    steps = sorted(runs["pmap"]["loss"])
    np.testing.assert_allclose([runs["fsdp"]["loss"][s] for s in steps], [runs["pmap"]["loss"][s] for s in steps],
                               rtol=1e-6)
    assert runs["fsdp"]["val_loss"][4] == pytest.approx(runs["pmap"]["val_loss"][4], rel=1e-6)


def test_an_aligned_doc_mask_run_trains_and_resumes_exactly(tmp_path):
    """--data.align=bos with --data.doc_mask=true: the table is built and told once, the run trains, and a
    resumed run draws the same windows from (seed, step)."""
    corpus = short_docs(tmp_path / "corpus")

    def config(out, **train_kw):
        cfg = tiny_config(tmp_path / out, corpus, max_steps=4, eval_interval=2, ckpt_interval=2, **train_kw)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, doc_mask=True, align="bos"))

    lines = []
    full = train(config("full"), log=lines.append)
    told = [line for line in lines if "--data.align=bos" in line]
    assert len(told) == 1 and "dropped" in told[0], lines
    assert full["val_loss"][4] < full["val_loss"][0]
    part = train(config("part"), log=quiet, stop_after=2)
    rest = train(config("part", resume=True), log=quiet)
    for s in range(1, 5):
        assert (part["loss"] | rest["loss"])[s] == full["loss"][s], s
    cfg = config("unaligned")
    unaligned = train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, align="none")), log=quiet)
    assert unaligned["loss"][1] != full["loss"][1]  # the windows are others
