"""The streamed preparation: every format gives the same shards, cuts are exact, the worker count and
stops change nothing, and bad input is counted, named and skipped."""

import bz2
import gzip
import json
import lzma
import os
import pickle
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import ROOT
from gptjax import data
from gptjax.config import DataConfig
from gptjax.data import sources, workers
from gptjax.data.sources import next_cut
from gptjax.errors import UserError
from gptjax.tokenizer import get_tokenizer

SMALL = dict(piece_chars=300, max_piece_chars=2000, chunk_chars=1500)  # many pieces and chunks from little text


def quiet(_):
    pass


def documents() -> list[str]:
    """Varied documents: code, prose in several scripts, CRLF lines, special-token text, one long
    enough to be cut many times, one line too long for any safe cut."""
    docs = [f"def f_{i}(x):\n    return x * {i}  # {'é' * (i % 3)}\n" * (3 + i % 5) for i in range(14)]
    docs += ["Ein Café, naïve 日本語のテキスト, emoji 🎉 and\n\nparagraphs.\n", "line one\r\nline two\r\nend\r\n",
             "text with <|endoftext|> inside it\n", "   \n\t indented\n        deeper\n", "no newline at the end"]
    docs.append("".join(f"    value_{j} = compute({j}, 'ß', [1, 2, 3])\n" for j in range(400)))
    docs.append("x" * 5000 + "\nshort tail\n")
    docs += [f"class C{i}:\n    pass\n" for i in range(8)]
    return docs


def write_formats(root, docs) -> dict[str, str]:
    """The same documents as a folder of text files, JSON Lines (plain and compressed four ways),
    Parquet, and a folder mixing three formats in document order."""
    specs = {}
    txt = root / "txt"
    txt.mkdir()
    for i, d in enumerate(docs):
        (txt / f"doc{i:03d}.txt").write_bytes(d.encode())
    specs["txt"] = str(txt)
    lines = "".join(json.dumps({"id": i, "text": d}, ensure_ascii=i % 2 == 0) + "\n" for i, d in enumerate(docs))
    raw = lines.encode()
    for name, blob in [("docs.jsonl", raw), ("docs.jsonl.gz", gzip.compress(raw)), ("docs.json.bz2", bz2.compress(raw)),
                       ("docs.jsonl.xz", lzma.compress(raw)),
                       ("docs.jsonl.zst", zstandard.ZstdCompressor().compress(raw[:900])
                        + zstandard.ZstdCompressor().compress(raw[900:]))]:  # two zstd frames
        (root / name).write_bytes(blob)
        specs[name] = str(root / name)
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "docs.parquet", row_group_size=7)
    specs["parquet"] = str(root / "docs.parquet")
    mixed = root / "mixed"
    mixed.mkdir()
    for i, d in enumerate(docs[:10]):
        (mixed / f"a{i:03d}.txt.gz").write_bytes(gzip.compress(d.encode()))
    (mixed / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:20]))
    pq.write_table(pa.table({"text": docs[20:]}), mixed / "c.parquet", row_group_size=3)
    specs["mixed"] = str(mixed)
    return specs


def shard_bytes(folder):
    return {name: (folder / name).read_bytes() for name in ("train.bin", "val.bin")}


def test_every_format_gives_byte_identical_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 37)  # streamed in tiny blocks that split UTF-8 characters
    specs = write_formats(tmp_path, documents())
    results = {}
    for name, spec in specs.items():
        ds = data.prepare(DataConfig(corpus=spec, tokenizer="gpt2", val_fraction=0.1), tmp_path / f"out-{name}",
                          log=quiet, **SMALL)
        assert ds.meta["documents"] == len(documents()) and not ds.meta["problems"]["counts"], name
        results[name] = shard_bytes(tmp_path / f"out-{name}")
    reference = results.pop("txt")
    assert len(reference["val.bin"]) > 0
    for name, got in results.items():
        assert got == reference, f"{name} differs from the same documents as text files"


def test_cuts_are_exact_for_the_gpt2_pre_tokenizer():
    """Pieces cut where next_cut allows, tokenized one by one, give the tokens of the whole text."""
    enc = get_tokenizer("gpt2").encoding
    texts = [f.read_text() for f in data.stdlib_files()[:60]]
    texts += [t.replace("\n", "\r\n") for t in texts[:10]] + documents()[:-8]
    cuts = 0
    for text in texts:
        for target in (40, 300):
            start, pieces = 0, []
            while start < len(text):
                end = next_cut(text, start, True, target, 10**9)  # no forced cuts
                pieces.append(text[start:end])
                start = end
            cuts += len(pieces) - 1
            assert "".join(pieces) == text
            assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text)
    assert cuts > 1000


def test_worker_count_does_not_change_the_shards(tmp_path):
    specs = write_formats(tmp_path, documents() * 3)
    one = data.prepare(DataConfig(corpus=specs["mixed"], workers=1), tmp_path / "w1", log=quiet, **SMALL)
    three = data.prepare(DataConfig(corpus=specs["mixed"], workers=3), tmp_path / "w3", log=quiet, **SMALL)
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w3")
    assert one.meta == three.meta


def broken_corpus(root):
    """Good documents among every kind of bad input."""
    root.mkdir()
    (root / "a.jsonl").write_text('{"text": "first good document"}\n{"text": broken\n\n{"body": "no text field"}\n'
                                  '[1, 2]\n{"text": "second good document"}\n{"text": null}\n')
    (root / "b.json").write_text('[\n  {"text": "one JSON document, not JSON Lines"}\n]\n')
    text = "".join(f.read_text() for f in data.stdlib_files()[:20])
    (root / "c.txt.gz").write_bytes(gzip.compress(("a long text file\n" * 200 + text).encode())[:20000])
    (root / "d.parquet").write_bytes(b"this is not parquet")
    (root / "e.bin").write_bytes(b"\x89PNG\x00\x00" * 100)
    (root / "f.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    lines = "".join(json.dumps({"text": line}) + "\n" for line in text.splitlines()).encode()
    (root / "g.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines)[:5000])
    pq.write_table(pa.table({"body": ["no text column"]}), root / "h.parquet")
    return root


def test_bad_input_is_counted_named_and_skipped(tmp_path):
    logs = []
    ds = data.prepare(DataConfig(corpus=str(broken_corpus(tmp_path / "c")), tokenizer="byte"), tmp_path / "d",
                      log=logs.append)
    counts = ds.meta["problems"]["counts"]
    assert counts == {"bad_json": 2, "no_field": 2, "unreadable": 3, "damaged": 2, "binary": 1, "replaced": 1}
    text = "\n".join(logs)
    for where in ["a.jsonl:2", "a.jsonl:4", "a.jsonl:5", "a.jsonl:7", "b.json (one JSON document",
                  "c.txt.gz (Compressed file ended", "d.parquet (not Parquet", "e.bin", "f.txt",
                  "g.jsonl.zst (the zstd stream ends inside a frame", "h.parquet (no column 'text'"]:
        assert where in text, where
    tokens = ds.train.to_numpy().tolist() + ds.val.to_numpy().tolist()
    decoded = bytes(t for t in tokens if t < 256).decode()
    assert "first good document" in decoded and "second good document" in decoded and "café au lait" \
        .replace("é", "\ufffd") in decoded
    assert decoded.count("a long text file") == 200  # what came before the damage is kept


@pytest.mark.slow
def test_nothing_usable_is_an_error_and_damages_nothing(tmp_path, corpus):
    folder = tmp_path / "d"
    data.prepare(DataConfig(corpus=str(corpus), tokenizer="byte"), folder, log=quiet)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"is empty: .*no usable documents") as e:
        data.prepare(DataConfig(corpus=str(bad), tokenizer="byte"), folder, log=quiet)
    assert "bad.jsonl:1 (no field 'text'; fields: body)" in str(e.value) and "bad.jsonl:2" in str(e.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    proc = subprocess.run([sys.executable, "-m", "gptjax.data", "prepare", f"--data.corpus={bad}",
                           f"--data.dir={tmp_path / 'cli'}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "no usable documents" in proc.stderr and "Traceback" not in proc.stderr


def test_an_interrupted_preparation_resumes_exactly(tmp_path, monkeypatch):
    """Stopped inside documents (tiny pieces), with problems met before and after the stop: the
    result, counts included, is that of a run without a stop."""
    specs = write_formats(tmp_path, documents() * 2)
    corpus = tmp_path / "mixed"
    broken_corpus(tmp_path / "broken")
    for p in (tmp_path / "broken").iterdir():
        p.rename(corpus / ("z" + p.name))
    cfg = DataConfig(corpus=specs["mixed"], tokenizer="gpt2", workers=1)  # in this process, where the stop is injected
    reference = data.prepare(cfg, tmp_path / "ref", log=quiet, **SMALL)

    calls = {"n": 0}
    real = workers.encode_chunk

    def stop_at_the_seventh(*args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(workers, "encode_chunk", stop_at_the_seventh)
    logs = []
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg, tmp_path / "d", log=logs.append, **SMALL)
    journal = json.loads((tmp_path / "d" / "progress.json").read_text())
    assert journal["next"][2] > 0 and not (tmp_path / "d" / "meta.json").exists()  # stopped inside a document
    assert "run the same command again" in logs[-1]
    monkeypatch.setattr(workers, "encode_chunk", real)
    (tmp_path / "d" / "train.bin.partial").open("ab").write(b"\x01\x02" * 333)  # written after the record: dropped
    logs.clear()
    resumed = data.prepare(cfg, tmp_path / "d", log=logs.append, **SMALL)
    assert any("resuming" in m for m in logs)
    assert shard_bytes(tmp_path / "d") == shard_bytes(tmp_path / "ref")
    assert resumed.meta == reference.meta and reference.meta["problems"]["counts"]["bad_json"] == 2
    assert not (tmp_path / "d" / "progress.json").exists()


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """160 MB of text: a preparation in one worker long enough to be stopped three times, each after at least
    one journal commit (every 2 s) of its own; at 80 MB a fast machine sometimes finished the third run
    before its signal came."""
    root = tmp_path_factory.mktemp("big")
    texts = [f.read_text() for f in data.stdlib_files()]
    size, i = 0, 0
    while size < 160e6:
        text = "".join(texts[i % len(texts): i % len(texts) + 50])
        (root / f"part{i // 50:04d}.txt").write_text(text)
        size, i = size + len(text), i + 50
    return root


def start_prepare(corpus, folder):
    """The preparation as a terminal's foreground command: Ctrl-C's SIGINT at its default, whatever this
    process inherited (a shell's background job, `cmd &`, starts with SIGINT ignored, and so would its
    children)."""
    return subprocess.Popen([sys.executable, "-m", "gptjax.data", "prepare", f"--data.corpus={corpus}",
                             f"--data.dir={folder}", "--data.tokenizer=gpt2", "--data.workers=1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_commit(folder, after=None, timeout=60):
    """The journal's position once it has moved past `after`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            position = json.loads((folder / "progress.json").read_text())["next"]
            if position != after:
                return position
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the preparation recorded no progress in time")


@pytest.mark.slow
def test_sigkill_sigterm_and_ctrl_c_resume_byte_identical(tmp_path, big_corpus):
    corpus = big_corpus
    data.prepare(DataConfig(corpus=str(corpus)), tmp_path / "ref", log=quiet)
    folder = tmp_path / "d"
    position = None
    for sig, code in [(signal.SIGKILL, -9), (signal.SIGTERM, 143), (signal.SIGINT, 130)]:
        proc = start_prepare(corpus, folder)
        position = wait_for_commit(folder, after=position)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == code, out
        assert not (folder / "meta.json").exists() and "Traceback" not in out
        if sig != signal.SIGKILL:
            assert "run the same command again to continue" in out
        assert position != [len(data.corpus_files(str(corpus))), 0, 0]
    proc = start_prepare(corpus, folder)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "resuming the preparation" in out, out
    assert shard_bytes(folder) == shard_bytes(tmp_path / "ref")
    assert json.loads((folder / "meta.json").read_text()) == json.loads((tmp_path / "ref" / "meta.json").read_text())
    assert not any(p.name.endswith(".partial") for p in folder.iterdir())


@pytest.mark.slow
def test_workers_end_with_their_parent(tmp_path, big_corpus):
    """A killed preparation leaves no worker behind: each ends when its input closes."""
    proc = subprocess.Popen([sys.executable, "-m", "gptjax.data", "prepare", f"--data.corpus={big_corpus}",
                             f"--data.dir={tmp_path / 'd'}", "--data.tokenizer=gpt2", "--data.workers=2"], cwd=ROOT)
    deadline, children = time.time() + 30, []
    while len(children) < 2 and time.time() < deadline:
        time.sleep(0.1)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    time.sleep(1)  # at work
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{c}") for c in children):
        time.sleep(0.1)
    alive = [c for c in children if os.path.exists(f"/proc/{c}")
             and "zombie" not in open(f"/proc/{c}/status").read()]
    assert not alive


@pytest.mark.slow
def test_a_worker_whose_input_is_cut_inside_a_chunk_ends():
    """A parent killed while it writes leaves a chunk's pickle cut short: the worker ends all the same (it
    waited forever for the next chunk when only a clean end of input was taken as the end)."""
    setup = pickle.dumps((get_tokenizer("byte").encoding, 256, "<u2"), protocol=pickle.HIGHEST_PROTOCOL)
    chunk = pickle.dumps([("def f(x):\n    return x\n" * 100, 0, True)], protocol=pickle.HIGHEST_PROTOCOL)
    proc = subprocess.Popen([sys.executable, "-c", "from gptjax.data.workers import serve; serve()"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdin.write(setup + chunk[:len(chunk) // 2])
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
