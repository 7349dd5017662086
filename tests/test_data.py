import json

import numpy as np
import pytest

from gptjax import data
from gptjax.config import DataConfig
from gptjax.errors import UserError


def test_default_corpus_is_the_stdlib_source():
    files = data.corpus_files("")
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert any(f.name == "os.py" for f in files)


def test_corpus_file_folder_glob(corpus):
    assert len(data.corpus_files(str(corpus))) == 40
    assert data.corpus_files(str(corpus / "doc001.py")) == [corpus / "doc001.py"]
    assert len(data.corpus_files(str(corpus / "doc00*.py"))) == 10
    (corpus / ".hidden").mkdir()
    (corpus / ".hidden" / "x.txt").write_text("not part of the corpus")
    assert len(data.corpus_files(str(corpus))) == 40


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.corpus_files(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="matches no files"):
        data.corpus_files(str(tmp_path / "*.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        data.corpus_files(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(UserError, match="is empty"):
        data.prepare(DataConfig(corpus=str(tmp_path / "blank.txt"), tokenizer="byte"), tmp_path / "d", log=lambda m: None)


def test_prepare_writes_shards_and_reuses_them(corpus, tmp_path):
    logs = []
    cfg = DataConfig(corpus=str(corpus), tokenizer="gpt2", val_fraction=0.1)
    ds = data.prepare(cfg, tmp_path / "d", log=logs.append)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16" and meta["documents"] == 40
    assert ds.train.dtype == np.uint16 and ds.train.size == meta["train_tokens"]
    total = ds.train.size + ds.val.size
    assert 0.05 < ds.val.size / total < 0.15
    # documents end with end-of-text: 40 documents, 40 separators over both splits
    assert int((ds.train == 50256).sum() + (ds.val == 50256).sum()) == 40

    logs.clear()
    again = data.prepare(cfg, tmp_path / "d", log=logs.append)
    assert "reusing" in logs[0]
    np.testing.assert_array_equal(again.train, ds.train)

    (corpus / "doc000.py").write_text("changed text\n")
    logs.clear()
    data.prepare(cfg, tmp_path / "d", log=logs.append)
    assert "corpus changed" in logs[0]

    logs.clear()
    byte = data.prepare(DataConfig(corpus=str(corpus), tokenizer="byte", val_fraction=0.1), tmp_path / "d",
                        log=logs.append)
    assert "tokenizer changed" in logs[0] and byte.meta["tokenizer"] == "byte"


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait, encore un caf\xe9\n".encode("latin-1") * 20)
    logs = []
    ds = data.prepare(DataConfig(corpus=str(f), tokenizer="byte"), tmp_path / "d", log=logs.append)
    assert ds.meta["replaced_bytes"] == 40
    assert any("40 undecodable" in m for m in logs)


def test_binary_files_in_a_folder_are_skipped(corpus, tmp_path):
    (corpus / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01" * 100)
    logs = []
    ds = data.prepare(DataConfig(corpus=str(corpus), tokenizer="byte"), tmp_path / "d", log=logs.append)
    assert ds.meta["skipped_files"] == 1 and any("binary" in m for m in logs)


def test_batches_are_a_pure_function_of_seed_and_step(corpus, tmp_path):
    ds = data.prepare(DataConfig(corpus=str(corpus), tokenizer="byte"), tmp_path / "d", log=lambda m: None)
    x1, y1 = data.train_batch(ds, 16, seed=3, step=5, grad_accum=2, batch_size=4)
    x2, y2 = data.train_batch(ds, 16, seed=3, step=5, grad_accum=2, batch_size=4)
    assert x1.shape == (2, 4, 16) and x1.dtype == np.int32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(x1[..., 1:], y1[..., :-1])  # targets are the inputs shifted by one
    assert not np.array_equal(x1, data.train_batch(ds, 16, seed=3, step=6, grad_accum=2, batch_size=4)[0])
    assert not np.array_equal(x1, data.train_batch(ds, 16, seed=4, step=5, grad_accum=2, batch_size=4)[0])
    v1, _ = data.val_batch(ds, 16, seed=3, index=0, batch_size=4)
    np.testing.assert_array_equal(v1, data.val_batch(ds, 16, seed=3, index=0, batch_size=4)[0])


def test_too_small_for_the_context(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("just a few words\n" * 30)
    ds = data.prepare(DataConfig(corpus=str(f), tokenizer="byte"), tmp_path / "d", log=lambda m: None)
    data.check_fits(ds, 16)
    with pytest.raises(UserError, match="too small for the context.*block_size \\+ 1 = 1,025"):
        data.check_fits(ds, 1024)
