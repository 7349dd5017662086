"""Documents into splits and chunks of work: which text is validation, the training text a tokenizer
learns from, and the reader's pieces packed into chunks for the workers.

The split is planned before any tokenizer learns, so that none learns from validation text:
- with --data.val_corpus, its documents are validation;
- otherwise document i is validation when floor((i + 1) f) > floor(i f), f = --data.val_fraction: an
  exact share, spread evenly and decided before the document is read;
- a corpus with too few documents for that (one large file, say) is cut in its text instead, near
  its last f of characters: at the first place from there, in the piece that holds that character,
  where the reader's own cutter (sources.next_cut) would cut, or else at that piece's end. Either is a
  place where the pre-tokenizer always breaks, so the two sides hold exactly the tokens of the text
  around the cut. Each side's last document ends with an end-of-text, as every document does. Only when
  the text's last piece has no such place after that character is the cut made at the character
  itself: validation would be empty otherwise.
The cut depends on the text and the piece sizes alone, both fixed for a preparation, so the tokenizer's
sample, the shards, a resumed run and any worker count all see the same one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptjax.config import DataConfig
from gptjax.data.sources import Problems, Reader, file_format, next_cut
from gptjax.runtime.disk import fmt_bytes


def in_val(index: int, fraction: float) -> bool:
    return int((index + 1) * fraction) > int(index * fraction)


def first_val_document(fraction: float) -> int:
    """The index of the first document in_val holds out (floating point may put it one later than 1/f says)."""
    index = max(0, math.ceil(1 / fraction) - 2)
    while not in_val(index, fraction):
        index += 1
    return index


def plan(files, cfg: DataConfig, val_corpus: bool, piece_chars: int, max_piece_chars: int) -> dict:
    """The split, as fields of the journal: "split" ("val_corpus", "documents" or "tail"), and for a tail
    the corpus's characters ("text_chars") and the one from which validation is cut ("val_from").

    Counting documents stops as soon as there are enough to hold one out, and a text file (one document)
    is known to be there from its first piece, so a large corpus costs a glance at its first documents.
    Only a corpus cut in its text is read through, streamed a piece at a time, to count its characters."""
    if val_corpus:
        return {"split": "val_corpus"}

    def pieces(some):
        return iter(Reader(some, cfg.text_field, Problems(), skip_binary=len(files) > 1, piece_chars=piece_chars,
                           max_piece_chars=max_piece_chars))

    enough, docs = first_val_document(cfg.val_fraction) + 1, 0
    for f in files:
        one_document = file_format(f)[0] == "text"
        stream = pieces([f])
        try:
            for piece in stream:
                docs += piece.where[2] == 0
                if docs >= enough:
                    return {"split": "documents"}
                if one_document:
                    break
        finally:
            stream.close()  # a file left after its first piece is closed now, not when collected
    chars = sum(len(piece.text) for piece in pieces(files))
    held = round(chars * cfg.val_fraction)
    if held < 1:  # too little text to hold any out (as too few tokens did before)
        return {"split": "documents"}
    return {"split": "tail", "text_chars": chars, "val_from": chars - held}


def tail_cut(text: str, at: int, split: dict) -> int:
    """Where validation begins in a piece that starts at character `at` of the corpus: 0 for a piece
    wholly after the cut, len(text) for one wholly before it."""
    want = split["val_from"] - at
    if want <= 0:
        return 0
    if want >= len(text):
        return len(text)
    cut = next_cut(text, 0, True, want, len(text))  # the first safe cut from `want` on, else the piece's end
    if at + cut == split["text_chars"]:
        cut = want  # no safe place before the text's end: validation would be empty
    return cut


class TrainingTexts:
    """An iterable of training text for learning a tokenizer: the pieces of every k-th training document,
    k chosen so that about `limit` characters are taken from a larger corpus, and never any text after a
    tail's cut; `chars` counts what was taken."""

    def __init__(self, files, cfg: DataConfig, split: dict, limit: int, piece_chars: int, max_piece_chars: int):
        self.files, self.cfg, self.split, self.limit, self.chars = files, cfg, split, limit, 0
        self.piece_chars, self.max_piece_chars = piece_chars, max_piece_chars
        self.every = max(1, -(-sum(f.stat().st_size for f in files) // limit))

    def __iter__(self):
        by_document, tail = self.split["split"] == "documents", self.split["split"] == "tail"
        docs, take, at = -1, False, 0
        for piece in Reader(self.files, self.cfg.text_field, Problems(), skip_binary=len(self.files) > 1,
                            piece_chars=self.piece_chars, max_piece_chars=self.max_piece_chars):
            if piece.where[2] == 0:
                docs += 1
                take = not (by_document and in_val(docs, self.cfg.val_fraction)) and docs % self.every == 0
            text, past_cut = piece.text, tail and at + len(piece.text) > self.split["val_from"]
            if past_cut:
                text = text[:tail_cut(text, at, self.split)]
            at += len(piece.text)
            if take and text:
                self.chars += len(text)
                yield text
            if past_cut or self.chars >= self.limit:
                return

    def left_out(self) -> str:
        """What the training text leaves out, for the line that says what a tokenizer learned from."""
        if self.split["split"] == "val_corpus":
            return "validation from --data.val_corpus"
        if self.split["split"] == "documents":
            return f"validation, {self.cfg.val_fraction * 100:g}% of the documents, left out"
        tail = fmt_bytes(self.split["text_chars"] - self.split["val_from"])  # characters, as bytes of ASCII
        return f"validation, the last {tail} of the {'file' if len(self.files) == 1 else 'corpus'}, left out"


@dataclass
class Chunk:
    pieces: list  # (text, split, ends_document)
    state: dict  # the journal's reader fields once this chunk is written: next position, counts, characters
    #              so far, a tail's cut once made, problems


def chunks(reader: Reader, state: dict, val_from_file: int | None, fraction: float, chunk_chars: int):
    """Pack the reader's pieces into chunks; decide each document's split as its first piece arrives, or
    for a tail, cut the piece that reaches state["val_from"] (state["val_cut"] records where, once cut)."""
    docs, val_docs, chars, val_cut = state["documents"], state["val_documents"], state["chars"], state["val_cut"]
    tail = state["split"] == "tail"
    f0, _, p0 = state["next"]
    current = docs - 1 if p0 else docs  # resuming inside a document: it was counted when it began
    to_val = (f0 >= val_from_file) if val_from_file is not None else in_val(current, fraction)
    pieces, size = [], 0

    def snapshot(where):
        return {"next": list(where), "documents": docs, "val_documents": val_docs, "chars": chars,
                "val_cut": val_cut, "problems": reader.problems.state()}

    for piece in reader:
        if size >= chunk_chars:
            yield Chunk(pieces, snapshot(piece.where))
            pieces, size = [], 0
        text, first = piece.text, piece.where[2] == 0
        at, chars = chars, chars + len(text)
        if first:
            docs += 1
            to_val = piece.where[0] >= val_from_file if val_from_file is not None else in_val(docs - 1, fraction)
        if not tail:
            val_docs += first and to_val
            pieces.append((text, int(to_val), piece.last))
        elif val_cut is None and chars > state["val_from"]:
            cut = tail_cut(text, at, state)
            val_cut = at + cut
            if cut or not first:  # the training side of this document ends here, with its end-of-text
                pieces.append((text[:cut], 0, True))
            if cut < len(text):
                pieces.append((text[cut:], 1, piece.last))
                val_docs += 1
        elif val_cut is None:
            pieces.append((text, 0, piece.last))
        else:
            pieces.append((text, 1, piece.last))
            val_docs += first or at == val_cut  # a document, or the rest of the one cut at its piece's end
        size += len(text)
    yield Chunk(pieces, snapshot((len(reader.files), 0, 0)))
