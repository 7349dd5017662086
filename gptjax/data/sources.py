"""Where documents come from: a corpus spec → files → documents, in pieces a worker can tokenize.

Formats, by file name (after an optional .gz, .bz2, .xz or .zst, which is read as a stream):
  .jsonl, .json   JSON Lines: one object per line, its text in --data.text_field
  .parquet        Parquet, a batch of rows at a time through pyarrow, the same field
  anything else   plain text, UTF-8: the whole file is one document

Nothing holds more than one piece of a document at a time. A document longer than `PIECE_CHARS`
is cut where GPT-2's pre-tokenizer always breaks (after a newline that has non-space characters on
both sides), so that tokenizing the pieces one by one gives exactly the tokens of the whole. The
cuts are a function of the text alone: a document streamed from a file and the same document read
whole from a JSON line are cut alike. Where no such place exists for `MAX_PIECE_CHARS` characters
(a single line of megabytes), the piece is cut there anyway.

Every piece carries its position (file, record, piece) and every problem met on the way (a line
that is not JSON, a record without the field, an unreadable or truncated file, undecodable bytes)
is counted, with the first few named, so a preparation can resume after its last committed piece
and count exactly what a run without a stop would have counted.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
import re
import sysconfig
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import zstandard

from gptjax import paths
from gptjax.errors import UserError

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
PIECE_CHARS = 1 << 20
MAX_PIECE_CHARS = 16 << 20
READ_BYTES = 1 << 20
BINARY_PROBE = 8192  # a NUL byte in a text file's first 8 KiB marks it binary
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

# Undecodable bytes become a lone surrogate first (valid UTF-8 never decodes to one), so each
# piece can count its own repairs exactly before they are turned into U+FFFD.
_MARK = "\udcff"
codecs.register_error("gptjax.mark", lambda e: (_MARK, e.end))

# The safe cuts: after "\n" with a non-space character on both sides; for CRLF text, between
# the "\r" and the "\n". The pre-tokenizer never joins characters across either place.
_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S\r)(?=\n\S)")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def corpus_files(spec: str, option: str = "corpus") -> list[Path]:
    """The files a corpus spec names, sorted; a clear error when it names none."""
    if not spec:
        files = stdlib_files()
        if not files:
            raise UserError("found no Python standard library source through sysconfig; give --data.corpus=PATH.")
        return files
    path = paths.expand(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"{option} folder {spec} holds no files. Give a file, a folder or a glob of text, "
                            "JSON Lines or Parquet files.")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(paths.expand_text(spec), recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"{option} glob {spec!r} matches no files.")
        return files
    raise UserError(f"{option} {spec} does not exist. Give a file, a folder or a glob (e.g. 'texts/**/*.txt') of "
                    "text, JSON Lines (.jsonl) or Parquet files, compressed or not (.gz, .bz2, .xz, .zst)"
                    + (", or leave --data.corpus empty for the Python standard library's source." if option == "corpus"
                       else "."))


def file_format(path: Path) -> tuple[str, str]:
    """(kind, compression suffix) from the file's name: kind is 'jsonl', 'parquet' or 'text'."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    base = name[: len(name) - len(compression)]
    if base.endswith((".jsonl", ".json")):
        return "jsonl", compression
    return ("parquet" if base.endswith(".parquet") else "text"), compression


def next_cut(text: str, start: int, eof: bool, target: int = PIECE_CHARS, maximum: int = MAX_PIECE_CHARS):
    """The end of the piece that begins at `start`: the first safe cut at least `target` characters
    on, or `start + maximum` where there is none that close. None: more text is needed to decide."""
    if len(text) - start <= target:
        return len(text) if eof else None
    m = _CUT.search(text, start + target, start + maximum + 2)  # a cut's look-ahead needs 2 characters
    if m and m.start() <= start + maximum:
        return m.start()
    if len(text) - start > maximum + 1:
        return start + maximum
    return len(text) if eof else None


class Piece(NamedTuple):
    text: str
    where: tuple[int, int, int]  # (file, record, piece): a document is (file, record)
    last: bool  # the last piece of its document


class Problems:
    """What was skipped or repaired: a count of each kind, and the first few places, named."""

    KINDS = {
        "binary": "binary file(s) skipped",
        "bad_json": "line(s) that are not a JSON object skipped",
        "no_field": "record(s) without the text field skipped",
        "unreadable": "unreadable file(s) skipped",
        "damaged": "damaged or truncated file(s), read up to the damage",
        "replaced": "undecodable byte sequence(s) replaced by U+FFFD",
    }
    EXAMPLES = 3

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.counts: dict[str, int] = dict(state.get("counts", {}))
        self.examples: dict[str, list[str]] = {k: list(v) for k, v in state.get("examples", {}).items()}

    def add(self, kind: str, where: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        seen = self.examples.setdefault(kind, [])
        if len(seen) < self.EXAMPLES:
            seen.append(where)

    def state(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def lines(self) -> list[str]:
        """One line per kind met: the count, what it means, the first places."""
        return [f"{self.counts[k]:,} {text}: {'; '.join(self.examples.get(k, []))}"
                for k, text in self.KINDS.items() if self.counts.get(k)]


class _ZstdStream(io.RawIOBase):
    """A .zst file's frames, one after another; a file that ends inside a frame is an error, not
    the silent end that zstandard's own stream reader gives."""

    def __init__(self, raw):
        self._raw, self._dctx, self._obj = raw, zstandard.ZstdDecompressor(), None
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            chunk = self._raw.read(READ_BYTES)
            if not chunk:
                if self._obj is not None and not self._obj.eof:
                    raise EOFError("the zstd stream ends inside a frame")
                return 0
            parts = []
            while chunk:
                if self._obj is None or self._obj.eof:
                    self._obj = self._dctx.decompressobj()
                parts.append(self._obj.decompress(chunk))
                chunk = self._obj.unused_data if self._obj.eof else b""
            self._out, self._at = b"".join(parts), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n


def _decompressing(raw, compression: str):
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if compression == ".bz2":
        return bz2.BZ2File(raw)
    if compression == ".xz":
        return lzma.LZMAFile(raw)
    if compression == ".zst":
        return io.BufferedReader(_ZstdStream(raw), READ_BYTES)
    return raw


# what a stream raises when its data is damaged or ends too soon
_DAMAGE = (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


class _Damaged(Exception):
    """A file's stream broke off: its (compressed) data is damaged or truncated."""


class Reader:
    """Every document of `files` in order, as pieces, from position `start`; what it skips or repairs
    is counted in `problems`. `done_bytes()` is how far through the files' bytes it has come."""

    def __init__(self, files: list[Path], text_field: str, problems: Problems, start=(0, 0, 0),
                 skip_binary: bool = True, piece_chars: int = PIECE_CHARS, max_piece_chars: int = MAX_PIECE_CHARS):
        self.files, self.field, self.problems = files, text_field, problems
        self.start, self.skip_binary = tuple(start), skip_binary
        self.piece_chars, self.max_piece_chars = piece_chars, max_piece_chars
        self.sizes = [f.stat().st_size for f in files]
        self.total_bytes = sum(self.sizes)
        self._finished = sum(self.sizes[:self.start[0]])
        self._position = lambda: 0  # bytes into the file being read

    def done_bytes(self) -> int:
        return self._finished + self._position()

    def __iter__(self) -> Iterator[Piece]:
        for i in range(self.start[0], len(self.files)):
            record, piece = self.start[1:] if i == self.start[0] else (0, 0)
            path = self.files[i]
            kind, compression = file_format(path)
            try:
                if kind == "parquet":
                    yield from self._parquet(i, record, piece, compression)
                else:
                    with open(path, "rb") as raw:
                        self._position = raw.tell
                        stream = _decompressing(raw, compression)
                        read = self._jsonl if kind == "jsonl" else self._text
                        yield from read(i, stream, record, piece)
            except _Damaged as e:
                self.problems.add("damaged", f"{path} ({e})")
            except OSError as e:  # could not be opened at all
                self.problems.add("unreadable", f"{path} ({e.strerror or e})")
            self._finished += self.sizes[i]
            self._position = lambda: 0

    def _cut(self, text: str, start: int, eof: bool):
        return next_cut(text, start, eof, self.piece_chars, self.max_piece_chars)

    def _repair(self, text: str, where: str) -> str:
        n = text.count(_MARK)
        if n:
            self.problems.add("replaced", where, n)
            text = text.replace(_MARK, "\ufffd")
        return text

    def _record(self, text: str, i: int, record: int, skip: int) -> Iterator[Piece]:
        """The pieces of one document held whole (a JSON line, a Parquet value), from piece `skip`."""
        start, n = 0, 0
        while start < len(text):
            end = self._cut(text, start, True)
            if n >= skip:
                yield Piece(text[start:end], (i, record, n), end == len(text))
            start, n = end, n + 1

    def _text(self, i: int, stream, record: int, skip: int) -> Iterator[Piece]:
        """A plain text file as one document, read a block at a time and cut as it comes. Blocks come
        from read1, so that a stream that breaks off keeps what it gave before; they are joined only
        when enough text has come to decide a cut."""
        path = self.files[i]
        decoder = codecs.getincrementaldecoder("utf-8")("gptjax.mark")
        buf, start, n, held, damaged = "", 0, 0, None, ""
        blocks, pending, first = [], 0, True
        while True:
            try:
                block = stream.read(BINARY_PROBE) if first else stream.read1(READ_BYTES)
            except _DAMAGE as e:  # keep what came before the damage, as a whole document
                damaged, block = f"{e}; read {self._position():,} bytes of it", b""
            eof = not block
            if first and self.skip_binary and b"\x00" in block:
                self.problems.add("binary", str(path))
                return
            first = False
            blocks.append(decoder.decode(block, final=eof))
            pending += len(blocks[-1])
            if pending < READ_BYTES and not eof:
                continue
            buf, start, blocks, pending = buf[start:] + "".join(blocks), 0, [], 0
            while (end := self._cut(buf, start, eof)) is not None and end > start:
                if n >= skip:  # the pieces before `skip` were committed earlier: nothing is counted twice
                    if held is not None:
                        yield held
                    held = Piece(self._repair(buf[start:end], str(path)), (i, record, n), False)
                start, n = end, n + 1
            if eof:
                break
        if held is not None:
            yield held._replace(last=True)
        if damaged:
            raise _Damaged(damaged)

    def _jsonl(self, i: int, stream, skip_records: int, skip: int) -> Iterator[Piece]:
        path, field = self.files[i], self.field
        line_no = 0
        try:
            for line_no, raw in enumerate(stream):
                if line_no < skip_records or not raw.strip():
                    continue
                where = f"{path}:{line_no + 1}"
                line = raw.decode("utf-8", "gptjax.mark")
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    if line_no == 0 and line.strip() in ("[", "{"):
                        self.problems.add("unreadable", f"{path} (one JSON document, not JSON Lines: one object "
                                                        "per line)")
                        return
                    self.problems.add("bad_json", f"{where} ({e.msg})")
                    continue
                if not isinstance(obj, dict):
                    self.problems.add("bad_json", f"{where} (a JSON {type(obj).__name__}, not an object)")
                    continue
                text = obj.get(field)
                if not isinstance(text, str):
                    self.problems.add("no_field", f"{where} (" + (f"no field {field!r}; fields: "
                                                                  f"{', '.join(list(obj)[:8])})" if field not in obj
                                                                  else f"{field!r} holds {json.dumps(text)[:20]}, "
                                                                       "not text)"))
                    continue
                yield from self._record(self._repair(text, where), i, line_no, skip if line_no == skip_records else 0)
        except _DAMAGE as e:
            raise _Damaged(f"{e}; read up to line {line_no + 1}") from None

    def _parquet(self, i: int, skip_records: int, skip: int, compression: str) -> Iterator[Piece]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path, field = self.files[i], self.field
        if compression:
            self.problems.add("unreadable", f"{path} (compressed Parquet: Parquet compresses its own columns; "
                                            "decompress the file first)")
            return
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            self.problems.add("unreadable", f"{path} (not Parquet: {e})")
            return
        schema = pf.schema_arrow
        if field not in schema.names:
            self.problems.add("unreadable", f"{path} (no column {field!r}; columns: {', '.join(schema.names[:8])})")
            return
        column_type = schema.field(field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
                or getattr(pa.types, "is_string_view", lambda t: False)(column_type)):
            self.problems.add("unreadable", f"{path} (column {field!r} holds {column_type}, not text)")
            return
        meta = pf.metadata
        total_rows = max(meta.num_rows, 1)
        groups, row = [], 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if row + rows > skip_records:
                groups.append(g)
            else:
                row += rows
        done = row
        self._position = lambda: self.sizes[i] * done // total_rows
        try:
            for batch in pf.iter_batches(batch_size=256, row_groups=groups, columns=[field], use_threads=False):
                for text in batch.column(0).to_pylist():
                    record, row = row, row + 1
                    done = row
                    if record < skip_records:
                        continue
                    if text is None:
                        self.problems.add("no_field", f"{path}: row {record} (null {field!r})")
                        continue
                    yield from self._record(self._repair(text, f"{path}: row {record}"), i, record,
                                            skip if record == skip_records else 0)
        except (pa.ArrowException, OSError) as e:
            raise _Damaged(f"{e}; read up to row {row}") from None
