"""A corpus of too few documents to hold whole ones out: validation is the text after a cut near its end,
made before any tokenizer learns, where the pre-tokenizer always breaks; the same in every form of the
text, with any worker count, and after any stop."""

import gzip
import json
import lzma

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gptjax import data
from gptjax.config import DataConfig
from gptjax.data import documents, workers
from gptjax.data.sources import Problems, Reader
from gptjax.runtime.disk import fmt_bytes
from gptjax.tokenizer import get_tokenizer

SMALL = dict(piece_chars=300, max_piece_chars=2000, chunk_chars=1500)  # many pieces and chunks from little text
MADE_UP = "qqzzqq"  # found only in the last 4% of the text


def quiet(_):
    pass


def book() -> str:
    """Code-like lines (no q or z anywhere), then the made-up word, repeated, as the text's last lines."""
    lines = [f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n" for i in range(50) for j in range(12)]
    body = "".join(lines)
    return body + f"{MADE_UP} {MADE_UP} {MADE_UP}\n" * (len(body) // 21 // 25)


def split_of(ds, text: str) -> tuple[str, str]:
    cut = ds.meta["val_cut"]
    return text[:cut], text[cut:]


@pytest.mark.parametrize("layout", [{}, SMALL], ids=["default-pieces", "small-pieces"])
def test_the_tokenizer_never_sees_the_tail_of_one_file(tmp_path, layout):
    f = tmp_path / "book.txt"
    f.write_text(book())
    text = f.read_text()
    logs = []
    ds = data.prepare(DataConfig(corpus=str(f), tokenizer="bpe", bpe_vocab=600, val_fraction=0.1), tmp_path / "d",
                      log=logs.append, **layout)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["split"] == "tail" and meta["documents"] == 1 and meta["val_documents"] == 1
    head, tail = split_of(ds, text)
    assert MADE_UP not in head and tail.count(MADE_UP) > 100
    assert head.endswith("\n") and not head[-2].isspace() and not tail[0].isspace()  # where tokenization breaks
    assert 0 <= round(len(text) * 0.1) - len(tail) < 60  # the first place past the last 10% to cut at
    ranks = ds.tokenizer.encoding._mergeable_ranks
    assert not any(pair in token for token in ranks for pair in (b"qq", b"zz", b"qz", b"zq"))
    assert b" return" in ranks  # what the training text is made of

    enc, eot = ds.tokenizer.encoding, meta["eot_id"]
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=meta["dtype"]).tolist()
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=meta["dtype"]).tolist()
    assert val == enc.encode_ordinary(tail) + [eot]  # each side ends its text with an end-of-text
    assert train == enc.encode_ordinary(head) + [eot]
    assert enc.encode_ordinary(head) + enc.encode_ordinary(tail) == enc.encode_ordinary(text)
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert (meta["train_bytes"], meta["val_bytes"]) == (len(head.encode()), len(tail.encode()))
    learned = next(m for m in logs if "learned a bpe" in m)
    assert f"of training text (validation, the last {fmt_bytes(round(len(text) * 0.1))} of the file, left out)" \
        in learned, learned
    assert f"validation is the text's last {fmt_bytes(len(tail))}, cut off before tokenizing" in logs[-1], logs[-1]


def test_the_cut_is_the_same_in_every_form_and_with_any_worker_count(tmp_path):
    text = book().replace("return x", "return é")  # some characters of two bytes
    raw = text.encode()
    forms = {"txt": ("book.txt", raw), "gz": ("book.txt.gz", gzip.compress(raw)),
             "zst": ("book.txt.zst", zstandard.ZstdCompressor().compress(raw)),
             "jsonl.xz": ("book.jsonl.xz", lzma.compress((json.dumps({"text": text}) + "\n").encode()))}
    specs = {}
    for name, (file_name, blob) in forms.items():
        (tmp_path / file_name).write_bytes(blob)
        specs[name] = str(tmp_path / file_name)
    pq.write_table(pa.table({"text": [text]}), tmp_path / "book.parquet")
    specs["parquet"] = str(tmp_path / "book.parquet")
    shards = {}
    for name, spec in specs.items():
        ds = data.prepare(DataConfig(corpus=spec, tokenizer="gpt2", val_fraction=0.1, workers=1), tmp_path / name,
                          log=quiet, **SMALL)
        shards[name] = [(tmp_path / name / f).read_bytes() for f in ("train.bin", "val.bin")], ds.meta["val_cut"]
    two = data.prepare(DataConfig(corpus=specs["txt"], tokenizer="gpt2", val_fraction=0.1, workers=2),
                       tmp_path / "two", log=quiet, **SMALL)
    shards["two workers"] = [(tmp_path / "two" / f).read_bytes() for f in ("train.bin", "val.bin")], two.meta["val_cut"]
    reference = shards.pop("txt")
    enc = get_tokenizer("gpt2")
    head, tail = text[:reference[1]], text[reference[1]:]
    assert np.frombuffer(reference[0][1], np.uint16).tolist() == enc.encoding.encode_ordinary(tail) + [enc.eot_id]
    assert np.frombuffer(reference[0][0], np.uint16).tolist() == enc.encoding.encode_ordinary(head) + [enc.eot_id]
    for name, got in shards.items():
        assert got == reference, name


def test_a_tail_over_several_documents(tmp_path):
    """Ten files at 9.5%, too few to hold the eleventh out: the tail takes the last file whole and the end of
    the one before it, each followed by its end-of-text; an eleventh file is held out whole."""
    folder = tmp_path / "c"
    folder.mkdir()
    texts = ["".join(f"line {i} of file {k}\n" for i in range(200 if k < 9 else 20)) for k in range(10)]
    for k, t in enumerate(texts):
        (folder / f"f{k}.txt").write_text(t)
    cfg = DataConfig(corpus=str(folder), tokenizer="byte", val_fraction=0.095)
    ds = data.prepare(cfg, tmp_path / "d", log=quiet)
    cut = ds.meta["val_cut"] - sum(len(t) for t in texts[:8])  # into the ninth file
    assert ds.meta["split"] == "tail" and (ds.meta["documents"], ds.meta["val_documents"]) == (10, 2)
    assert 0 < cut < len(texts[8]) and texts[8][cut - 1] == "\n"
    as_text = lambda tokens: bytes(np.where(tokens == 256, 0, tokens).astype(np.uint8)).decode()  # noqa: E731
    assert as_text(ds.val.to_numpy()) == texts[8][cut:] + "\0" + texts[9] + "\0"
    assert as_text(ds.train.to_numpy()) == "".join(t + "\0" for t in texts[:8]) + texts[8][:cut] + "\0"

    (folder / "g.txt").write_text("one more document\n")
    whole = data.prepare(cfg, tmp_path / "e", log=quiet)
    assert whole.meta["split"] == "documents" and whole.meta["val_documents"] == 1
    assert whole.val.size == len("one more document\n") + 1


def test_the_tail_cut_in_a_piece():
    split = {"val_from": 110, "text_chars": 1000}
    piece = "a\nb\n" + " x" * 40 + "\n" + "tail\nstarts\n  here\n"  # characters 100 to 203 of the corpus
    assert documents.tail_cut(piece, 100, split) == piece.index("tail")  # the first safe cut past 110
    assert documents.tail_cut(piece, 0, split) == len(piece)  # wholly before
    assert documents.tail_cut(piece, 110, split) == 0  # begins where validation does
    assert documents.tail_cut("x" * 50, 100, split) == 50  # no place to cut: at the piece's end
    last = {"val_from": 110, "text_chars": 150}
    assert documents.tail_cut("x" * 50, 100, last) == 10  # ...unless that would leave no validation


def test_every_chunk_boundary_resumes_to_the_same_pieces(tmp_path):
    """The cut at a piece's end (a line too long to cut in), resumed from each chunk's record: the same
    pieces, splits and end-of-text marks, and the same counts, as without a stop."""
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1000)) + "x" * 1000 + "\n" + "end line\n" * 60)
    split = documents.plan([f], DataConfig(val_fraction=0.1), False, 300, 2000)
    assert split["split"] == "tail" and 8890 < split["val_from"] < 9890  # inside the long line
    fresh = {"next": [0, 0, 0], "documents": 0, "val_documents": 0, "chars": 0, "val_cut": None, "problems": {},
             **split}

    def pieces_from(state):
        reader = Reader([f], "text", Problems(state["problems"]), start=state["next"], skip_binary=False,
                        piece_chars=300, max_piece_chars=2000)
        return list(documents.chunks(reader, state, None, 0.1, 1))  # one piece a chunk, or two for the cut piece

    reference = pieces_from(dict(fresh))
    entries = [e for c in reference for e in c.pieces]
    cut_at = next(i for i, (_, s, _) in enumerate(entries) if s)
    assert entries[cut_at - 1][2] and entries[cut_at - 1][0].endswith("x\n")  # the long line ends training
    assert "".join(t for t, _, _ in entries) == f.read_text() and sum(e for _, _, e in entries) == 2
    for k in range(len(reference) - 1):
        resumed = pieces_from({**fresh, **reference[k].state})
        assert [c.pieces for c in resumed] == [c.pieces for c in reference[k + 1:]], k
        assert resumed[-1].state == reference[-1].state


def test_a_stopped_tail_preparation_resumes_exactly(tmp_path, monkeypatch):
    """Stopped at every other chunk, before the cut and after it: each resumed run gives the shards, tokenizer
    and meta of a run without a stop."""
    f = tmp_path / "book.txt"
    f.write_text(book())
    cfg = DataConfig(corpus=str(f), tokenizer="bpe", bpe_vocab=600, val_fraction=0.1, workers=1)
    real, calls = workers.encode_chunk, {"n": 0, "stop": 0}

    def counted(*args):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(workers, "encode_chunk", counted)
    data.prepare(cfg, tmp_path / "ref", log=quiet, **SMALL)
    names = ("train.bin", "val.bin", "tokenizer.tiktoken", "meta.json")
    reference = {n: (tmp_path / "ref" / n).read_bytes() for n in names}
    stopped_after_the_cut = set()
    for stop in range(1, calls["n"] + 1, 2):
        calls.update(n=0, stop=stop)
        folder = tmp_path / f"stop{stop}"
        with pytest.raises(KeyboardInterrupt):
            data.prepare(cfg, folder, log=quiet, **SMALL)
        stopped_after_the_cut.add(json.loads((folder / "progress.json").read_text())["val_cut"] is not None)
        calls["stop"] = 0
        data.prepare(cfg, folder, log=quiet, **SMALL)
        assert {n: (folder / n).read_bytes() for n in names} == reference, stop
    assert stopped_after_the_cut == {False, True}


def test_shards_whose_tail_was_split_off_the_tokens_are_made_again(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1000)))
    cfg = DataConfig(corpus=str(f), tokenizer="byte", val_fraction=0.1)
    data.prepare(cfg, tmp_path / "d", log=quiet)
    meta_path = tmp_path / "d" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["val_cut"]  # as an older gptjax wrote them
    meta_path.write_text(json.dumps(meta))
    logs = []
    again = data.prepare(cfg, tmp_path / "d", log=logs.append)
    assert "validation is now cut from the text before tokenizing" in logs[0] and "val_cut" in again.meta
    logs.clear()
    data.prepare(cfg, tmp_path / "d", log=logs.append)
    assert "reusing" in logs[0]
