"""python -m gptjax.eval on several named texts (each scored alone, and all as one) and on folders of prepared
shards (their validation split, and --text=mix: each source of a mixture's run)."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import tiny_config
from test_eval import DOCS


@pytest.fixture
def eval_main(monkeypatch):
    """python -m gptjax.eval's main, run in this process, whose CPU settings it must leave as they are."""
    from gptjax.eval.__main__ import main

    monkeypatch.setenv("GPTJAX_CPU_TUNING", "off")
    return lambda *args: main([str(a) for a in args], as_script=False)


def test_text_specs_are_one_text_or_named_ones(tmp_path, monkeypatch):
    from gptjax.eval.text import parse_texts

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lang=en").mkdir()
    (tmp_path / "lang=en" / "a.txt").write_text("a\n")
    assert parse_texts("held_out.txt") == [("", "held_out.txt")]  # a text as today, even one that is not there
    assert parse_texts("a,b.txt") == [("", "a,b.txt")]
    # a path with '=' that names files is one text
    assert parse_texts("lang=en/*.txt") == [("", "lang=en/*.txt")] and parse_texts("lang=en") == [("", "lang=en")]
    assert parse_texts("data/k=v/*.txt") == [("", "data/k=v/*.txt")]
    assert parse_texts("web=shards/web, code = corpora/code ") == [("web", "shards/web"), ("code", "corpora/code")]
    assert parse_texts("web=a=b.txt") == [("web", "a=b.txt")]


@pytest.mark.parametrize("text, says", [
    ("web=a.txt,web=b.txt", "names the text 'web' twice"),
    ("=a.txt", "'=a.txt' is not NAME=TEXT"),
    ("web=a.txt,b.txt", "'b.txt' is not NAME=TEXT"),
    ("web=", "'web=' is not NAME=TEXT"),
    ("web=a.txt,code=missing", "--text code missing does not exist"),
])
def test_bad_named_texts_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, eval_main, text, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("a\n")
    with pytest.raises(SystemExit) as e:
        eval_main("no_run", f"--text={text}")  # no checkpoint there: never read
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and says in err, err


def test_the_text_option_given_twice_is_refused(capsys, eval_main):
    with pytest.raises(SystemExit) as e:
        eval_main("out/run", "--text=a.txt", "--text", "b.txt")
    assert e.value.code == 2 and "--text is given more than once" in capsys.readouterr().err


def test_named_texts_score_as_each_alone_and_all_by_bytes(task_run, tmp_path, capsys, eval_main):
    """Each named text's figures are those of the text scored alone; all of them together are one text's: bits
    per byte over all the bytes (the texts' own, weighted by their bytes), the loss over all the tokens."""
    run, corpus = task_run.run, task_run.corpus
    prose = tmp_path / "prose.jsonl"
    prose.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    code = f"{corpus}/doc00*.py"
    alone = {name: eval_main(run, f"--text={spec}", "--stride=8")["text"]
             for name, spec in (("code", code), ("prose", prose))}
    out = tmp_path / "figures.json"
    capsys.readouterr()
    results = eval_main(run, f"--text=code={code},prose={prose}", "--stride=8", f"--output={out}")
    shown = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    figures = results["texts"]
    assert list(figures) == ["code", "prose"] and figures["prose"]["text"] == str(prose)
    for name in figures:
        same = ("tokens", "bytes", "documents", "loss", "perplexity", "bits_per_byte", "problems")
        assert {k: figures[name][k] for k in same} == {k: alone[name][k] for k in same}
    total = results["text"]
    nbytes = alone["code"]["bytes"] + alone["prose"]["bytes"]
    assert total["bytes"] == nbytes and total["tokens"] == alone["code"]["tokens"] + alone["prose"]["tokens"]
    assert total["bits_per_byte"] == pytest.approx(
        sum(alone[n]["bits_per_byte"] * alone[n]["bytes"] for n in alone) / nbytes, rel=1e-12)
    assert total["loss"] == pytest.approx(sum(alone[n]["loss"] * alone[n]["tokens"] for n in alone) / total["tokens"])
    rows = {line.split()[0]: line.split() for line in shown.splitlines() if line.split()[:1] in (["code"], ["prose"],
                                                                                                   ["all"])}
    assert rows["prose"][6] == f"{alone['prose']['bits_per_byte']:.4f}"
    assert rows["all"][6] == f"{total['bits_per_byte']:.4f}" and rows["all"][1] == f"{total['tokens']:,}"


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory):
    """A tiny model trained 2 steps on a mixture of two corpora, each prepared into <run>/data/<NAME>."""
    from gptjax.config import DataConfig
    from gptjax.train.trainer import train
    from conftest import make_corpus

    root = tmp_path_factory.mktemp("mix_run")
    make_corpus(root / "code")
    (root / "prose").mkdir()
    for i in range(20):
        (root / "prose" / f"p{i:02d}.txt").write_text(DOCS[1] * (1 + i % 3) + f"n° {i}\n")
    cfg = tiny_config(root / "run", "", max_steps=2, eval_interval=2, ckpt_interval=2, eval_batches=1)
    cfg = dataclasses.replace(cfg, data=DataConfig(mix=f"code={root / 'code'}:1,prose={root / 'prose'}:1",
                                                   tokenizer="byte", val_fraction=0.2))
    train(cfg, log=lambda m: None)
    return root


def val_documents(folder, out):
    """A byte-level shard folder's validation documents written back as JSON Lines text."""
    meta = json.loads((folder / "meta.json").read_text())
    ids = np.fromfile(folder / "val.bin", dtype=meta["dtype"])
    ends = np.flatnonzero(ids == meta["eot_id"])  # each document is followed by end-of-text
    assert len(ends) > 1 and ends[-1] == len(ids) - 1
    docs = [bytes(ids[a:b].astype(np.uint8)) for a, b in zip([0, *(ends[:-1] + 1)], ends)]
    out.write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in docs))
    return out


def test_shards_score_their_validation_split_as_its_text(mix_run, tmp_path, eval_main):
    """A folder of prepared shards is scored on its validation split: the figures of its documents as text.
    --text=mix scores each source of the run's mixture so, by name."""
    run, same = mix_run / "run", ("tokens", "bytes", "documents", "loss", "perplexity", "bits_per_byte")
    mixed = eval_main(run, "--text=mix", "--stride=8")
    assert list(mixed["texts"]) == ["code", "prose"]
    for name in ("code", "prose"):
        folder = mix_run / "run" / "data" / name
        as_text = eval_main(run, f"--text={val_documents(folder, tmp_path / f'{name}.jsonl')}", "--stride=8")["text"]
        as_shards = eval_main(run, f"--text={folder}", "--stride=8")["text"]
        assert {k: as_shards[k] for k in same} == {k: as_text[k] for k in same} == {k: mixed["texts"][name][k]
                                                                                    for k in same}
        assert mixed["texts"][name]["text"] == str(folder)
    assert mixed["text"]["bytes"] == sum(mixed["texts"][n]["bytes"] for n in ("code", "prose"))


def test_shards_of_another_tokenizer_and_mix_without_a_mixture_are_refused(mix_run, task_run, tmp_path, capsys,
                                                                             eval_main):
    shards = tmp_path / "gpt2"
    shards.mkdir()
    meta = json.loads((mix_run / "run" / "data" / "code" / "meta.json").read_text())
    (shards / "meta.json").write_text(json.dumps({**meta, "tokenizer": "gpt2"}))
    for run, text, says in ((mix_run / "run", f"code={shards}", f"--text code {shards} holds shards of the gpt2 "
                             "tokenizer, but the model reads byte tokens: give the corpus"),
                            (task_run.run, "mix", f"--text=mix scores the sources of a mixture's run, but "
                             f"{task_run.run} was not trained on a --data.mix")):
        with pytest.raises(SystemExit) as e:
            eval_main(run, f"--text={text}")
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err, err
