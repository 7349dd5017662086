"""A mixture's sources read from disk (gptjax.data.mixture): one learned bpe for all, learned from the corpora in
the mixture's proportions and kept for the next start; prepared sources of different learned tokenizers refused."""

import pytest

from conftest import make_corpus
from gptjax.config import DataConfig
from gptjax.data import mixture, prepare
from gptjax.errors import UserError

def _prose(path, n_docs=20):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (path / f"doc{i:03d}.txt").write_text("".join(f"The owl number {i} sat on mat {j}.\n" for j in range(10)))
    return path

def _cfg(**kw):
    return DataConfig(tokenizer="bpe", bpe_vocab=512, val_fraction=0.1, workers=1, **kw)

def test_a_learned_bpe_mixture_has_one_tokenizer_and_keeps_it(tmp_path):
    make_corpus(tmp_path / "code", n_docs=20)
    _prose(tmp_path / "prose")
    cfg = _cfg(mix=f"code={tmp_path / 'code'}:3,prose={tmp_path / 'prose'}:1")
    logs = []
    m = mixture.load(cfg, tmp_path / "data", 16, log=logs.append)
    assert any("learned one bpe tokenizer" in line for line in logs)
    code, prose = m.datasets
    assert code.tokenizer.same_as(prose.tokenizer) and code.tokenizer.ranks_text
    assert (tmp_path / "data" / mixture.MIX_TOKENIZER).is_file()
    assert m.names == ["code", "prose"] and list(m.weights(0)) == [0.75, 0.25]
    logs.clear()
    again = mixture.load(cfg, tmp_path / "data", 16, log=logs.append)  # a resumed start: nothing learned again
    assert not any("learned one" in line for line in logs), logs
    assert again.datasets[0].tokenizer.same_as(code.tokenizer)

def test_prepared_sources_of_different_learned_tokenizers_are_refused(tmp_path):
    a = prepare(_cfg(corpus=str(make_corpus(tmp_path / "code", n_docs=20))), tmp_path / "a", log=lambda *_: None)
    b = prepare(_cfg(corpus=str(_prose(tmp_path / "prose"))), tmp_path / "b", log=lambda *_: None)
    assert not a.tokenizer.same_as(b.tokenizer)
    with pytest.raises(UserError, match="different learned bpe tokenizers"):
        mixture.load(_cfg(mix=f"a={tmp_path / 'a'}:1,b={tmp_path / 'b'}:1"), tmp_path / "data", 16)
    assert not (tmp_path / "data").exists()

def test_a_corpus_in_a_mixture_takes_a_prepared_sources_learned_tokenizer(tmp_path):
    a = prepare(_cfg(corpus=str(make_corpus(tmp_path / "code", n_docs=20))), tmp_path / "a", log=lambda *_: None)
    m = mixture.load(_cfg(mix=f"a={tmp_path / 'a'}:1,prose={_prose(tmp_path / 'prose')}:1"), tmp_path / "data", 16,
                     log=lambda *_: None)
    assert m.datasets[1].tokenizer.same_as(a.tokenizer)
    assert not (tmp_path / "data" / mixture.MIX_TOKENIZER).exists()

def test_a_missing_source_is_named():
    with pytest.raises(UserError, match="nowhere"):
        mixture.load(_cfg(mix="x=/nowhere/at/all:1"), "/tmp/unused-data", 16)


def test_prepare_on_the_command_line_prepares_a_mixtures_corpora(tmp_path):
    from gptjax.data.__main__ import main

    make_corpus(tmp_path / "code", n_docs=20)
    _prose(tmp_path / "prose")
    main(["prepare", f"--out_dir={tmp_path / 'run'}", "--data.tokenizer=byte",
          f"--data.mix=code={tmp_path / 'code'}:1,prose={tmp_path / 'prose'}:1"])
    assert sorted(p.name for p in (tmp_path / "run" / "data").iterdir()) == ["code", "prose"]
    assert all((tmp_path / "run" / "data" / n / "meta.json").is_file() for n in ("code", "prose"))
