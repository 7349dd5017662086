"""A tokenizer learned from the corpus: learned from training text only, resumable with the shards,
carried by every checkpoint, and kept by a fine-tune on another corpus."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from conftest import make_corpus, tiny_config
from gptjax import data, load
from gptjax.config import DataConfig
from gptjax.data import workers
from gptjax.errors import UserError
from gptjax.tokenizer import bpe_tokenizer, learn_bpe, ranks_to_text
from gptjax.train.trainer import train


def quiet(_):
    pass


def bpe_config(out_dir, corpus, **train_kw):
    cfg = tiny_config(out_dir, corpus, **train_kw)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="bpe", bpe_vocab=600))


def test_learned_ranks_are_deterministic_and_round_trip(corpus):
    texts = [f.read_text() for f in sorted(corpus.iterdir())]
    ranks = learn_bpe(texts, 600)
    assert ranks == learn_bpe(texts, 600) and len(ranks) <= 600
    assert all(ranks[bytes([b])] == b for b in range(256))
    tok = bpe_tokenizer(ranks_to_text(ranks))
    assert tok.vocab_size == len(ranks) + 1 and tok.eot_id == len(ranks)
    for text in texts[:5] + ["unseen text: ünïcode, <|endoftext|> and \r\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2  # the corpus's own words are few tokens


def test_the_tokenizer_never_sees_validation_documents(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=20)
    (corpus / "doc009.py").write_text("qqqwww " * 400)  # the tenth of 20 documents: validation at 0.1
    logs = []
    ds = data.prepare(DataConfig(corpus=str(corpus), tokenizer="bpe", bpe_vocab=600, val_fraction=0.1),
                      tmp_path / "d", log=logs.append)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["tokenizer_file"] == "tokenizer.tiktoken"
    assert meta["split"] == "documents" and meta["val_documents"] == 2 and "val_cut" not in meta
    assert ds.tokenizer.vocab_size == meta["vocab_size"] <= 601
    assert not any(b"qq" in token for token in ds.tokenizer.encoding._mergeable_ranks)
    assert b" return" in ds.tokenizer.encoding._mergeable_ranks  # what the training documents are made of
    val_text = bytes(b for t in ds.val.to_numpy().tolist() if t != ds.tokenizer.eot_id
                     for b in ds.tokenizer.encoding.decode_single_token_bytes(t)).decode()
    assert val_text == (corpus / "doc009.py").read_text() + (corpus / "doc019.py").read_text()
    learned = next(m for m in logs if "learned a bpe" in m)
    assert "of training text (validation, 10% of the documents, left out)" in learned, learned


def test_a_stopped_bpe_preparation_resumes_with_the_same_tokenizer(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "c", n_docs=60)
    cfg = DataConfig(corpus=str(corpus), tokenizer="bpe", bpe_vocab=600, workers=1)
    small = dict(piece_chars=300, max_piece_chars=2000, chunk_chars=1500)
    data.prepare(cfg, tmp_path / "ref", log=quiet, **small)
    real, calls = workers.encode_chunk, {"n": 0}

    def stop_at_the_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(workers, "encode_chunk", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg, tmp_path / "d", log=quiet, **small)
    assert (tmp_path / "d" / "tokenizer.tiktoken.partial").is_file()
    monkeypatch.setattr(workers, "encode_chunk", real)
    logs = []
    data.prepare(cfg, tmp_path / "d", log=logs.append, **small)
    assert not any("learned a bpe" in m for m in logs)  # resumed with the tokenizer it had learned
    for name in ("train.bin", "val.bin", "tokenizer.tiktoken", "meta.json"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_a_bpe_run_carries_its_tokenizer_and_a_fine_tune_keeps_it(corpus, tmp_path):
    whole = train(bpe_config(tmp_path / "whole", corpus), log=quiet)
    train(bpe_config(tmp_path / "split", corpus), log=quiet, stop_after=6)
    resumed = train(bpe_config(tmp_path / "split", corpus, resume=True), log=quiet)
    assert [resumed["loss"][s] for s in range(7, 13)] == [whole["loss"][s] for s in range(7, 13)]
    learned = (tmp_path / "whole" / "data" / "tokenizer.tiktoken").read_text()
    shutil.rmtree(tmp_path / "whole" / "data")  # a checkpoint needs nothing beside it
    model = load(tmp_path / "whole")
    assert model.tokenizer.name == "bpe" and model.tokenizer.ranks_text == learned
    assert model.config.model.vocab_size == model.tokenizer.vocab_size
    assert isinstance(model.generate("def function_1", max_new_tokens=8, temperature=0), str)
    assert np.isfinite(model.bits_per_byte("def function_1_2(x):\n    return x\n"))

    other = make_corpus(tmp_path / "other", n_docs=12)
    (other / "extra.py").write_text("class Other:\n    pass\n" * 30)
    cfg = bpe_config(tmp_path / "tuned", other, init_from=str(tmp_path / "whole"), max_steps=2, eval_interval=2)
    train(cfg, log=quiet)
    assert (tmp_path / "tuned" / "data" / "tokenizer.tiktoken").read_text() == learned
    assert load(tmp_path / "tuned").tokenizer.ranks_text == learned

    with pytest.raises(UserError, match="--data.tokenizer=bpe .* cannot be exported"):
        from gptjax.weights.hf import save_hf

        save_hf(model.config, model.params, tmp_path / "hf")
