import dataclasses
import json

import numpy as np
import pytest

from conftest import make_corpus, tiny_config
from gptjax import data
from gptjax.config import DataConfig
from gptjax.errors import UserError
from gptjax.tokenizer import get_tokenizer


def quiet(_):
    pass


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
        data.prepare(DataConfig(corpus=str(tmp_path / "blank.txt"), tokenizer="byte"), tmp_path / "d", log=quiet)


def documents_of(tokens: np.ndarray, eot: int) -> list[tuple]:
    ends = np.flatnonzero(tokens == eot)
    return [tuple(tokens[a + 1 if i else 0:b].tolist()) for i, (a, b) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


def test_validation_holds_out_whole_documents(corpus, tmp_path):
    cfg = DataConfig(corpus=str(corpus), tokenizer="gpt2", val_fraction=0.1)
    ds = data.prepare(cfg, tmp_path / "d", log=quiet)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16" and meta["documents"] == 40
    assert meta["val_documents"] == 4 and meta["split"] == "documents"
    assert ds.train.dtype == np.uint16 and ds.train.size == meta["train_tokens"]
    enc = get_tokenizer("gpt2")
    docs = [tuple(enc.encode(f.read_text())) for f in data.corpus_files(str(corpus))]
    val = documents_of(ds.val.to_numpy(), enc.eot_id)
    train = documents_of(ds.train.to_numpy(), enc.eot_id)
    assert val == [docs[i] for i in (9, 19, 29, 39)]  # every tenth document, whole
    assert train == [d for i, d in enumerate(docs) if i not in (9, 19, 29, 39)]
    assert meta["train_bytes"] + meta["val_bytes"] == sum(f.stat().st_size for f in data.corpus_files(str(corpus)))


def test_shards_are_reused_until_corpus_or_tokenizer_change(corpus, tmp_path):
    cfg = DataConfig(corpus=str(corpus), tokenizer="gpt2", val_fraction=0.1)
    ds = data.prepare(cfg, tmp_path / "d", log=quiet)
    logs = []
    again = data.prepare(cfg, tmp_path / "d", log=logs.append)
    assert "reusing" in logs[0]
    np.testing.assert_array_equal(again.train.to_numpy(), ds.train.to_numpy())
    (corpus / "doc000.py").write_text("changed text\n")
    logs.clear()
    data.prepare(cfg, tmp_path / "d", log=logs.append)
    assert "corpus or settings changed" in logs[0]
    logs.clear()
    byte = data.prepare(dataclasses.replace(cfg, tokenizer="byte"), tmp_path / "d", log=logs.append)
    assert "tokenizer changed" in logs[0] and byte.meta["tokenizer"] == "byte"


def test_a_separate_validation_corpus(corpus, tmp_path):
    val = make_corpus(tmp_path / "val", n_docs=3)
    ds = data.prepare(DataConfig(corpus=str(corpus), val_corpus=str(val), tokenizer="byte"), tmp_path / "d", log=quiet)
    assert ds.meta["split"] == "val_corpus" and ds.meta["val_documents"] == 3 and ds.meta["documents"] == 43
    assert ds.val.size == sum(f.stat().st_size + 1 for f in val.iterdir())
    assert ds.train.size == sum(f.stat().st_size + 1 for f in corpus.iterdir())
    with pytest.raises(UserError, match="val_corpus .* does not exist"):
        data.prepare(DataConfig(corpus=str(corpus), val_corpus=str(tmp_path / "nope")), tmp_path / "e", log=quiet)


def test_one_document_holds_out_the_text_after_a_cut_near_its_end(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1000)))
    ds = data.prepare(DataConfig(corpus=str(f), tokenizer="byte", val_fraction=0.1), tmp_path / "d", log=quiet)
    text, cut = f.read_bytes(), ds.meta["val_cut"]
    as_bytes = lambda tokens: bytes(np.where(tokens == 256, 0, tokens).astype(np.uint8))  # noqa: E731  0: end-of-text
    assert ds.meta["split"] == "tail" and text[cut - 1:cut + 5] == b"\nline "  # after a newline, between lines
    assert as_bytes(ds.train.to_numpy()) == text[:cut] + b"\0" and as_bytes(ds.val.to_numpy()) == text[cut:] + b"\0"
    assert 0 <= len(text) * 0.1 - len(text[cut:]) < len("line 999\n")  # the first line that starts in the last 10%
    assert (ds.meta["train_bytes"], ds.meta["val_bytes"]) == (cut, len(text) - cut)
    assert (ds.meta["documents"], ds.meta["val_documents"]) == (1, 1)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait, encore un caf\xe9\n".encode("latin-1") * 20)
    logs = []
    ds = data.prepare(DataConfig(corpus=str(f), tokenizer="byte"), tmp_path / "d", log=logs.append)
    assert ds.meta["problems"]["counts"]["replaced"] == 40
    assert any("40 undecodable" in m for m in logs)


def test_binary_files_in_a_folder_are_skipped(corpus, tmp_path):
    (corpus / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01" * 100)
    logs = []
    ds = data.prepare(DataConfig(corpus=str(corpus), tokenizer="byte"), tmp_path / "d", log=logs.append)
    assert ds.meta["problems"]["counts"] == {"binary": 1} and any("binary" in m for m in logs)


def halves(tmp_path, tokenizer="byte"):
    """The test corpus prepared as two folders, as two machines would."""
    corpus = make_corpus(tmp_path / "corpus")
    files = sorted(corpus.iterdir())
    for name, part in (("a", files[:20]), ("b", files[20:])):
        (tmp_path / "src" / name).mkdir(parents=True)
        for f in part:
            (tmp_path / "src" / name / f.name).write_bytes(f.read_bytes())
        data.prepare(DataConfig(corpus=str(tmp_path / "src" / name), tokenizer=tokenizer, val_fraction=0.1),
                     tmp_path / "shards" / name, log=quiet)
    return tmp_path / "shards"


def test_several_folders_are_read_as_one(tmp_path):
    shards = halves(tmp_path)
    a, b = (data.load(DataConfig(dir=str(shards / n), tokenizer="byte"), tmp_path / "x", log=quiet) for n in "ab")
    both = data.load(DataConfig(dir=f"{shards / 'a'},{shards / 'b'}", tokenizer="byte"), tmp_path / "x", log=quiet)
    globbed = data.load(DataConfig(dir=str(shards / "*"), tokenizer="byte"), tmp_path / "x", log=quiet)
    whole = np.concatenate([a.train.to_numpy(), b.train.to_numpy()])
    for ds in (both, globbed):
        assert ds.train.size == a.train.size + b.train.size and ds.val.size == a.val.size + b.val.size
        np.testing.assert_array_equal(ds.train.to_numpy(), whole)
        start = a.train.size - 10  # a window across the two folders
        np.testing.assert_array_equal(ds.train.window(start, 33), whole[start:start + 33])
        x, _ = data.train_batch(ds, 16, seed=0, step=0, grad_accum=1, batch_size=64)
        assert x.shape == (1, 64, 16)
    assert not (tmp_path / "x").exists()  # nothing prepared: the folders were read as they are


def test_several_folders_refuse_what_does_not_fit(tmp_path):
    shards = halves(tmp_path)
    with pytest.raises(UserError, match="read as they are, so --data.corpus"):
        data.load(DataConfig(dir=str(shards / "*"), corpus=str(tmp_path / "src"), tokenizer="byte"), tmp_path, quiet)
    with pytest.raises(UserError, match="holds no prepared shards"):
        data.load(DataConfig(dir=f"{shards / 'a'},{tmp_path / 'nope'}", tokenizer="byte"), tmp_path, quiet)
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "meta.json").write_text('{"format": 2, "tokeni')  # there, but cut short
    with pytest.raises(UserError, match="meta.json is there but is not a JSON object that can be read"):
        data.load(DataConfig(dir=f"{shards / 'a'},{tmp_path / 'garbled'}", tokenizer="byte"), tmp_path, quiet)
    with pytest.raises(UserError, match="glob .* matches no folders"):
        data.load(DataConfig(dir=str(tmp_path / "none*"), tokenizer="byte"), tmp_path, quiet)
    with pytest.raises(UserError, match="shards of the byte tokenizer, but this run uses gpt2"):
        data.load(DataConfig(dir=str(shards / "*"), tokenizer="gpt2"), tmp_path, quiet)


def test_shards_written_by_another_program(tmp_path):
    """The documented format: two files of token ids and a meta.json with six fields."""
    folder = tmp_path / "other"
    folder.mkdir()
    ids = np.arange(3000, dtype="<u2") % 257
    ids.tofile(folder / "train.bin")
    ids[:500].tofile(folder / "val.bin")
    meta = {"format": 2, "tokenizer": "byte", "dtype": "uint16", "eot_id": 256, "train_tokens": 3000,
            "val_tokens": 500}
    (folder / "meta.json").write_text(json.dumps(meta))
    ds = data.load(DataConfig(dir=str(folder), tokenizer="byte"), tmp_path, quiet)
    np.testing.assert_array_equal(ds.train.to_numpy(), ids)
    (folder / "val.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="val.bin holds 10 bytes, but meta.json says 500 uint16 tokens"):
        data.load(DataConfig(dir=str(folder), tokenizer="byte"), tmp_path, quiet)
    (folder / "meta.json").write_text(json.dumps({"format": 2, "tokenizer": "byte"}))
    with pytest.raises(UserError, match="lacks dtype, eot_id, train_tokens, val_tokens"):
        data.load(DataConfig(dir=str(folder), tokenizer="byte"), tmp_path, quiet)


def test_a_run_trains_on_several_folders(tmp_path):
    from gptjax.train.trainer import train

    shards = halves(tmp_path)
    cfg = tiny_config(tmp_path / "run", "", max_steps=4, eval_interval=2, ckpt_interval=4)
    cfg = dataclasses.replace(cfg, data=DataConfig(dir=str(shards / "*"), tokenizer="byte"))
    history = train(cfg, log=quiet)
    assert len(history["loss"]) == 4 and np.isfinite(list(history["val_loss"].values())).all()


def test_batches_are_a_pure_function_of_seed_and_step(corpus, tmp_path):
    ds = data.prepare(DataConfig(corpus=str(corpus), tokenizer="byte"), tmp_path / "d", log=quiet)
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
    ds = data.prepare(DataConfig(corpus=str(f), tokenizer="byte"), tmp_path / "d", log=quiet)
    data.check_fits(ds, 8)
    with pytest.raises(UserError, match="too small for the context.*block_size \\+ 1 = 1,025"):
        data.check_fits(ds, 1024)
