"""Corpus → token shards, streamed: bounded memory, every core, resumable, and never half-used.

The reader (sources.Reader) yields pieces of documents in order; they are packed into chunks of
about `CHUNK_CHARS` characters; worker processes tokenize the chunks (workers.TokenizerPool); the
results are appended in order to train.bin.partial and val.bin.partial. Memory holds a few chunks
per worker, whatever the size of the corpus, and the output does not depend on the worker count.

The split is planned before a tokenizer learns (documents.plan): whole documents (of
--data.val_corpus, or every k-th for --data.val_fraction), or for a corpus of too few documents
(one large file, say) the text after a cut near its end, made where the pre-tokenizer always
breaks. A learned tokenizer sees training text only.

Resumable: every two seconds or so the partial files are flushed to disk and progress.json records
their lengths, the reader's position and the counts so far. A preparation stopped at any moment
(Ctrl-C, SIGTERM, SIGKILL, power loss) continues from there when run again with the same corpus
and settings: the partial files are cut back to the recorded lengths, so nothing written after
the record is used, and the result is byte for byte that of a run without a stop. Only when all
is written are the partial files renamed to train.bin and val.bin, and meta.json written last;
until then, shards prepared earlier in the folder stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np

from gptjax.runtime import disk
from gptjax.config import DataConfig
from gptjax.data import documents, durable, progress
from gptjax.data.shards import FORMAT_VERSION, SPLITS, TOKENIZER_FILE, Dataset, open_folder, read_meta
from gptjax.data.sources import MAX_PIECE_CHARS, PIECE_CHARS, Problems, Reader, corpus_files
from gptjax.data.workers import TokenizerPool, WorkerError
from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer, bpe_tokenizer, get_tokenizer, learn_bpe, ranks_to_text

CHUNK_CHARS = 1 << 20  # characters of text per chunk of work
COMMIT_SECONDS = 2.0
JOURNAL = "progress.json"
JOURNAL_VERSION = 2  # what a journal records; one of another version is not resumed
BPE_SAMPLE_CHARS = 64 << 20  # at most this much of the training text teaches a bpe tokenizer


def _fingerprint(cfg: DataConfig, files: list[Path], val_files: list[Path], given: Tokenizer | None = None) -> str:
    tokenizer = f"bpe{cfg.bpe_vocab}" if cfg.tokenizer == "bpe" else cfg.tokenizer
    if given is not None and given.ranks_text:
        tokenizer = "given:" + hashlib.sha256(given.ranks_text.encode()).hexdigest()
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{tokenizer}|{cfg.val_fraction}|{cfg.text_field}".encode())
    for group in (files, val_files):
        h.update(b"|group")
        for f in group:
            st = f.stat()
            h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _source(spec: str) -> str:
    import sysconfig

    return spec or "stdlib:" + sysconfig.get_paths()["stdlib"]


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def choose_workers(cfg: DataConfig, files: list[Path], chunk_chars: int = CHUNK_CHARS) -> int:
    """--data.workers, or one per core, but no more than the corpus has chunks of work for: a worker's
    start (a fresh interpreter) costs more than it saves on a few megabytes."""
    if cfg.workers:
        return cfg.workers
    return min(default_workers(), max(1, sum(f.stat().st_size for f in files) // (4 * chunk_chars)))


class _Preparation:
    """One preparation of `files` (then `val_files`) into `folder`, resumed from its journal if any."""

    def __init__(self, cfg: DataConfig, folder: Path, files, val_files, fingerprint: str, log,
                 piece_chars: int, max_piece_chars: int, chunk_chars: int, given: Tokenizer | None = None):
        self.cfg, self.folder, self.log, self.given = cfg, folder, log, given
        self.files, self.val_files = files, val_files
        self.layout = {"fingerprint": fingerprint, "piece_chars": piece_chars, "max_piece_chars": max_piece_chars,
                       "journal": JOURNAL_VERSION}
        self.chunk_chars = chunk_chars
        self.partial = {s: folder / f"{s}.bin.partial" for s in SPLITS}
        self.tokenizer_partial = folder / (TOKENIZER_FILE + ".partial")
        self.journal_path = folder / JOURNAL
        # the dtype is known before the tokenizer is learned: from the largest vocabulary it may have
        vocab = (given.vocab_size if given is not None else cfg.bpe_vocab + 1 if cfg.tokenizer == "bpe"
                 else get_tokenizer(cfg.tokenizer).vocab_size)
        self.dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32).newbyteorder("<")
        self.state = self._resume_state()
        self.tok = self._tokenizer()
        self.worker_peak = 0

    def _tokenizer(self) -> Tokenizer:
        """The named tokenizer, or a bpe learned from the training text (kept beside the partial shards,
        so that a resumed preparation goes on with the same one)."""
        cfg = self.cfg
        if cfg.tokenizer != "bpe":
            return get_tokenizer(cfg.tokenizer)
        if self.given is not None:  # a fine-tune goes on with its source's tokenizer
            durable.write_text(self.tokenizer_partial, self.given.ranks_text)
            return self.given
        # a partial file that outlived _resume_state belongs to the journal it resumes (a complete one may
        # already have been renamed)
        for path in (self.tokenizer_partial, *([self.folder / TOKENIZER_FILE] if self.state["complete"] else [])):
            if path.is_file():
                return bpe_tokenizer(path.read_text())
        started = time.time()
        texts = documents.TrainingTexts(self.files, cfg, self.state, BPE_SAMPLE_CHARS, self.layout["piece_chars"],
                                        self.layout["max_piece_chars"])
        ranks_text = ranks_to_text(learn_bpe(texts, cfg.bpe_vocab))
        durable.write_text(self.tokenizer_partial, ranks_text)
        tok = bpe_tokenizer(ranks_text)
        self.log(f"data: learned a bpe tokenizer of {tok.vocab_size:,} tokens from {disk.fmt_bytes(texts.chars)} of "
                 f"training text ({texts.left_out()}) in {time.time() - started:.1f} s")
        return tok

    def _resume_state(self) -> dict:
        saved = self.cut_back()
        if saved is None:
            started = time.time()
            split = documents.plan(self.files, self.cfg, bool(self.val_files), self.layout["piece_chars"],
                                   self.layout["max_piece_chars"])
            if split["split"] == "tail":
                self.log(f"data: too few documents to hold whole ones out: validation is the text after a cut "
                         f"near character {split['val_from']:,} of {split['text_chars']:,} (counted in "
                         f"{time.time() - started:.1f} s)")
            return {"next": [0, 0, 0], "documents": 0, "val_documents": 0, "chars": 0, "val_cut": None,
                    "problems": {}, "train_tokens": 0, "val_tokens": 0, "train_bytes": 0, "val_bytes": 0,
                    "input_done": False, "complete": False, **split}
        if saved["next"] != [0, 0, 0]:
            done = saved["train_tokens"] + saved["val_tokens"]
            self.log(f"data: resuming the preparation of {self.folder} ({done:,} tokens were written)")
        return saved

    def cut_back(self) -> dict | None:
        """Make the folder what the journal records: the partial files cut back to its lengths (removed
        when there is no usable journal), nothing written after the record kept. Returns the record."""
        for tmp in self.folder.glob("*.json.tmp"):  # a record being written when the process stopped
            tmp.unlink(missing_ok=True)
        try:
            saved = json.loads(self.journal_path.read_text())
        except (OSError, ValueError):
            saved = None
        if (isinstance(saved, dict) and saved.get("layout") == self.layout
                and (saved.get("complete") or all(p.is_file() for p in self.partial.values()))):
            if not saved["complete"]:
                for split, path in self.partial.items():  # drop whatever was written after the record
                    with open(path, "r+b") as f:
                        f.truncate(saved[f"{split}_tokens"] * self.dtype.itemsize)
            return saved
        for path in (*self.partial.values(), self.tokenizer_partial):
            path.unlink(missing_ok=True)
        return None

    def space_needed(self) -> int:
        """Bytes the shards still need: their whole size, estimated from the tokens per byte of text so far
        (one token per byte before any is written), less what is on disk."""
        reader, state = getattr(self, "reader", None), self.state
        tokens = state["train_tokens"] + state["val_tokens"]
        done = reader.done_bytes() if reader else 0
        total = reader.total_bytes if reader else sum(f.stat().st_size for f in self.files + self.val_files)
        per_byte = tokens / done if tokens and done else 1.0
        written = sum(p.stat().st_size for p in self.partial.values() if p.exists())
        return max(int(total * per_byte * self.dtype.itemsize) - written, 4096)

    def _commit(self, files: dict) -> None:
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
        durable.write_json(self.journal_path, {**self.state, "layout": self.layout})

    def run(self, workers: int) -> dict:
        """Tokenize what is left, then finish; return meta.json's content."""
        if self.state["complete"]:
            return self._finish()
        if not self.state["input_done"]:
            self._tokenize(workers)
        self._check_usable()
        self.state["complete"] = True
        durable.write_json(self.journal_path, {**self.state, "layout": self.layout})
        return self._finish()

    def _tokenize(self, workers: int) -> None:
        cfg, state = self.cfg, self.state
        problems = Problems(state["problems"])
        all_files = self.files + self.val_files
        reader = Reader(all_files, cfg.text_field, problems, start=state["next"], skip_binary=len(all_files) > 1,
                        piece_chars=self.layout["piece_chars"], max_piece_chars=self.layout["max_piece_chars"])
        val_from = len(self.files) if self.val_files else None
        self.reader = reader  # for space_needed()
        chunks = documents.chunks(reader, state, val_from, cfg.val_fraction, self.chunk_chars)
        shown = progress.Progress(reader.total_bytes, self.log)
        started, text_bytes = time.time(), 0
        files = {s: open(p, "ab") for s, p in self.partial.items()}
        last_commit = time.time()
        try:
            with durable.sigterm_stops(), TokenizerPool(self.tok.encoding, self.tok.eot_id, self.dtype, workers) as pool:
                for chunk, (ids, nbytes) in pool.map(chunks):
                    for split, arr in zip(SPLITS, ids):
                        files[split].write(memoryview(arr).cast("B"))
                    new = {"train_tokens": state["train_tokens"] + len(ids[0]),
                           "val_tokens": state["val_tokens"] + len(ids[1]),
                           "train_bytes": state["train_bytes"] + nbytes[0],
                           "val_bytes": state["val_bytes"] + nbytes[1]}
                    state.update(chunk.state, **new)
                    text_bytes += nbytes[0] + nbytes[1]
                    if time.time() - last_commit >= COMMIT_SECONDS:
                        self._commit(files)
                        last_commit = time.time()
                    shown.update(reader.done_bytes(), text_bytes, state["train_tokens"] + state["val_tokens"])
                state["input_done"] = True
                self._commit(files)
                self.worker_peak = pool.peak_rss()
        except (KeyboardInterrupt, durable.Stopped) as e:
            self._commit(files)  # every chunk written so far is whole: keep it
            shown.close()
            signum = e.signum if isinstance(e, durable.Stopped) else signal.SIGINT
            self.log(f"data: preparation stopped by {signal.Signals(signum).name} after "
                     f"{state['train_tokens'] + state['val_tokens']:,} tokens; run the same command again to "
                     "continue where it stopped")
            if isinstance(e, KeyboardInterrupt):
                raise
            raise SystemExit(128 + signum) from None
        except WorkerError as e:
            self._commit(files)
            raise UserError(str(e)) from None
        finally:
            for f in files.values():
                f.close()
        shown.close()
        self.elapsed, self.text_bytes = time.time() - started, text_bytes

    def _check_usable(self) -> None:
        state, cfg = self.state, self.cfg
        problems = Problems(state["problems"]).lines()
        detail = (" What was met: " + " | ".join(problems) + ".") if problems else ""
        if not state["train_tokens"]:
            self._discard()
            raise UserError(f"corpus {cfg.corpus or 'stdlib'} is empty: its {len(self.files):,} file(s) hold no "
                            f"usable documents (for JSON Lines and Parquet, the text goes in the field "
                            f"--data.text_field={cfg.text_field!r}).{detail} Nothing was changed in {self.folder}.")
        if self.val_files and not state["val_tokens"]:
            self._discard()
            raise UserError(f"validation corpus {cfg.val_corpus} is empty: its {len(self.val_files):,} file(s) "
                            f"hold no usable documents.{detail} Nothing was changed in {self.folder}.")

    def _discard(self) -> None:
        for path in (*self.partial.values(), self.tokenizer_partial, self.journal_path):
            path.unlink(missing_ok=True)

    def _finish(self) -> dict:
        """Put the new shards in place of the old ones, then declare them complete (meta.json last)."""
        state, tok, cfg = self.state, self.tok, self.cfg
        meta = {
            "format": FORMAT_VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "dtype": self.dtype.name, "source": _source(cfg.corpus), "val_source": cfg.val_corpus,
            "text_field": cfg.text_field, "files": len(self.files), "val_files": len(self.val_files),
            "documents": state["documents"], "val_documents": state["val_documents"],
            "split": state["split"], **({"val_cut": state["val_cut"]} if state["split"] == "tail" else {}),
            "val_fraction": cfg.val_fraction,
            **{k: state[k] for k in ("train_tokens", "val_tokens", "train_bytes", "val_bytes")},
            "problems": state["problems"], "fingerprint": self.layout["fingerprint"],
            **({"tokenizer_file": TOKENIZER_FILE} if tok.ranks_text else {}),
        }
        (self.folder / "meta.json").unlink(missing_ok=True)
        for split, path in self.partial.items():
            if path.exists():
                os.replace(path, self.folder / f"{split}.bin")
        if self.tokenizer_partial.exists():
            os.replace(self.tokenizer_partial, self.folder / TOKENIZER_FILE)
        durable.write_json(self.folder / "meta.json", meta)
        self.journal_path.unlink(missing_ok=True)
        durable.fsync_dir(self.folder)
        return meta


def prepare(cfg: DataConfig, data_dir: str | Path, log=print, shared: bool = False, *, stats: dict | None = None,
            tokenizer: Tokenizer | None = None, piece_chars=PIECE_CHARS, max_piece_chars=MAX_PIECE_CHARS,
            chunk_chars=CHUNK_CHARS) -> Dataset:
    """Tokenize the corpus into `data_dir` once; reuse the shards while corpus and settings stay the same.

    A `shared` folder (named by --data.dir, perhaps used by other runs) holding shards of another
    tokenizer or another corpus is refused rather than overwritten. `tokenizer`, a learned bpe, is used
    instead of learning one. `stats`, if given, receives how the work went: workers, seconds, text
    bytes and the largest worker's peak memory.
    """
    folder = Path(data_dir)
    files = corpus_files(cfg.corpus)
    val_files = corpus_files(cfg.val_corpus, option="val_corpus") if cfg.val_corpus else []
    fingerprint = _fingerprint(cfg, files, val_files, tokenizer)

    def reuse() -> Dataset | None:
        meta = read_meta(folder)
        if not meta:
            return None
        # shards whose validation tail was split off the tokens, after a tokenizer had learned from it, are
        # made again: their validation figure is not one on unseen text
        old_tail = meta.get("split") == "tail" and "val_cut" not in meta
        if meta.get("fingerprint") == fingerprint and not old_tail:
            log(f"data: reusing {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {folder}")
            return open_folder(folder, meta)
        if shared and meta.get("tokenizer") != cfg.tokenizer:
            raise UserError(f"{folder} holds token shards of the {meta.get('tokenizer')} tokenizer, but this run "
                            f"uses {cfg.tokenizer}. Give another --data.dir (or leave it empty for <out_dir>/data), "
                            f"or --data.tokenizer={meta.get('tokenizer')}; the shards were left as they are.")
        if shared and meta.get("source") not in (None, _source(cfg.corpus)):
            raise UserError(f"{folder} holds token shards of another corpus ({meta.get('source')}). Give another "
                            "--data.dir, or leave --data.corpus empty to train on those shards as they are; the "
                            "shards were left as they are.")
        why = ("tokenizer changed" if meta.get("tokenizer") != cfg.tokenizer else "corpus or settings changed"
               if meta.get("fingerprint") != fingerprint else "validation is now cut from the text before tokenizing")
        log(f"data: {why} since {folder} was prepared; tokenizing again")
        return None

    ds = reuse()
    if ds is not None:
        return ds
    with durable.locked(folder, log):
        ds = reuse()  # another process may have prepared it while this one waited
        if ds is not None:
            return ds
        job = _Preparation(cfg, folder, files, val_files, fingerprint, log, piece_chars, max_piece_chars,
                           chunk_chars, tokenizer)
        workers = choose_workers(cfg, files + val_files, chunk_chars)
        try:
            meta = job.run(workers)
        except Exception as e:
            if not disk.is_write_failure(e):
                raise
            raise _write_failed(job, e) from None
    progress.report(meta, folder, getattr(job, "elapsed", None), getattr(job, "text_bytes", 0), workers, log)
    if stats is not None:
        stats.update(workers=workers, seconds=getattr(job, "elapsed", 0.0), text_bytes=getattr(job, "text_bytes", 0),
                     worker_peak_rss=job.worker_peak)
    return open_folder(folder, meta)


def _write_failed(job: _Preparation, error: Exception) -> UserError:
    """The disk refused the shards: keep what the journal records (a run again continues from there),
    free whatever was written after it, and say how much more is needed."""
    saved = job.cut_back()
    needed = job.space_needed()
    tokens = saved["train_tokens"] + saved["val_tokens"] if saved and not saved.get("complete") else 0
    done = (f"The {tokens:,} tokens written before are kept, and the preparation continues from them when run "
            "again." if tokens else "The partial shards were removed.")
    return disk.write_error(error, job.folder, "the token shards", needed, done=done,
                            then="run the same command again")
