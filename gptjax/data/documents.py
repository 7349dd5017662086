"""Documents into splits and chunks of work: which document is validation, the training documents a
tokenizer learns from, and the reader's pieces packed into chunks for the workers."""

from __future__ import annotations

from dataclasses import dataclass

from gptjax.config import DataConfig
from gptjax.data.sources import Problems, Reader


def in_val(index: int, fraction: float) -> bool:
    return int((index + 1) * fraction) > int(index * fraction)


class TrainingTexts:
    """An iterable of the training documents' pieces for learning a tokenizer: every k-th training
    document, k chosen so that about `limit` characters are taken from a larger corpus; `chars`
    counts what was taken."""

    def __init__(self, files, cfg: DataConfig, all_train: bool, limit: int):
        self.files, self.cfg, self.all_train, self.limit, self.chars = files, cfg, all_train, limit, 0
        self.every = max(1, -(-sum(f.stat().st_size for f in files) // limit))

    def __iter__(self):
        docs, take = -1, False
        for piece in Reader(self.files, self.cfg.text_field, Problems(), skip_binary=len(self.files) > 1):
            if piece.where[2] == 0:
                docs += 1
                take = (self.all_train or not in_val(docs, self.cfg.val_fraction)) and docs % self.every == 0
            if take:
                self.chars += len(piece.text)
                yield piece.text
            if self.chars >= self.limit:
                return


@dataclass
class Chunk:
    pieces: list  # (text, split, ends_document)
    state: dict  # the journal's reader fields once this chunk is written: next position, counts, problems


def chunks(reader: Reader, state: dict, val_from_file: int | None, fraction: float, chunk_chars: int):
    """Pack the reader's pieces into chunks; decide each document's split as its first piece arrives."""
    docs, val_docs = state["documents"], state["val_documents"]
    f0, _, p0 = state["next"]
    current = docs - 1 if p0 else docs  # resuming inside a document: it was counted when it began
    to_val = (f0 >= val_from_file) if val_from_file is not None else in_val(current, fraction)
    pieces, size = [], 0

    def snapshot(where):
        return {"next": list(where), "documents": docs, "val_documents": val_docs,
                "problems": reader.problems.state()}

    for piece in reader:
        if size >= chunk_chars:
            yield Chunk(pieces, snapshot(piece.where))
            pieces, size = [], 0
        if piece.where[2] == 0:
            to_val = piece.where[0] >= val_from_file if val_from_file is not None else in_val(docs, fraction)
            docs, val_docs = docs + 1, val_docs + to_val
        pieces.append((piece.text, int(to_val), piece.last))
        size += len(piece.text)
    yield Chunk(pieces, snapshot((len(reader.files), 0, 0)))
