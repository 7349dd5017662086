"""Scoring a whole text, streamed: documents → token ids → overlapping context windows → totals.

The documents come from a corpus spec as training reads it (text, JSON Lines, Parquet, compressed
or not), a piece at a time, and are tokenized as the training data is: each document followed by
end-of-text, and one end-of-text before the first, so that the first document's first token is
scored too, as the start of a document. The end-of-text tokens are scored (as in the validation
loss) but have no bytes: bits per byte divide by the UTF-8 bytes of the documents' text alone.

Windows of the model's context advance by `stride` tokens; each scores only the targets that the
windows before it did not, so every token after the first is scored exactly once, with at least
context − stride tokens of its window before it (all that exist, near the start). Memory holds
one window, one stride and a piece of a document, whatever the size of the text.
"""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from gptjax import paths
from gptjax.data.shards import read_meta
from gptjax.data.sources import Problems, Reader, corpus_files
from gptjax.data.workers import encode_chunk
from gptjax.errors import UserError
from gptjax.model.score import Scorer, sliding_windows


@dataclass
class TextScore:
    tokens: int  # targets scored (the documents' tokens and their end-of-text tokens)
    bytes: int  # UTF-8 bytes of the documents' text
    documents: int
    loss: float  # mean negative log-likelihood per token, in nats
    perplexity: float
    bits_per_byte: float | None
    seconds: float  # compilation included
    tokens_per_s: float  # after the first batch (compilation excluded)

    def as_dict(self) -> dict:
        return asdict(self)


def score_documents(scorer: Scorer, reader: Reader, tokenizer, stride: int,
                    progress: Callable[[int, float], None] | None = None) -> TextScore:
    """Score every document `reader` yields; `progress(tokens scored, share of the input read)` after each batch."""
    eot = tokenizer.eot_id
    read = {"bytes": 0, "documents": 0}

    def chunks():
        yield np.array([eot], np.int32)
        for piece in reader:
            (ids, _), (nbytes, _) = encode_chunk(tokenizer.encoding, eot, np.int32, [(piece.text, 0, piece.last)])
            read["bytes"] += nbytes
            read["documents"] += piece.last
            yield ids

    start = time.perf_counter()
    nll, tokens = 0.0, 0
    warm = (start, 0)  # time and tokens after the first batch, which includes compiling: the rate starts there
    for i, s in enumerate(scorer.windows(sliding_windows(chunks(), scorer.block_size, stride))):
        nll -= float(np.sum(s.logp, dtype=np.float64))
        tokens += len(s.logp)
        if (i + 1) % scorer.batch_size == 0:
            if i + 1 == scorer.batch_size:
                warm = (time.perf_counter(), tokens)
            if progress is not None:
                progress(tokens, reader.done_bytes() / max(reader.total_bytes, 1))
    end = time.perf_counter()
    if tokens == 0:
        raise UserError("the text holds no document to score: every file was empty or skipped.")
    if tokens == warm[1]:  # a single batch: no rate without its compilation
        warm = (start, 0)
    loss = nll / tokens
    return TextScore(tokens=tokens, bytes=read["bytes"], documents=read["documents"], loss=loss,
                     perplexity=math.exp(loss), seconds=end - start,
                     tokens_per_s=(tokens - warm[1]) / max(end - warm[0], 1e-9),
                     bits_per_byte=nll / math.log(2) / read["bytes"] if read["bytes"] else None)


def score_text(scorer: Scorer, files, tokenizer, stride: int, text_field: str = "text",
               progress=None) -> tuple[TextScore, Problems]:
    """Score the documents of `files` (as gptjax.data.sources.corpus_files lists them)."""
    problems = Problems()
    reader = Reader(list(files), text_field, problems)
    return score_documents(scorer, reader, tokenizer, stride, progress), problems


def check_stride(stride: int, block_size: int) -> int:
    """The stride to use: 0 means half the context."""
    stride = stride or max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise UserError(f"--stride={stride} must be between 1 (every token scored with the full context of "
                        f"{block_size} tokens) and the context, {block_size} (windows that do not overlap); "
                        "0 takes half the context.")
    return stride


def parse_texts(spec: str) -> list[tuple[str, str]]:
    """--text as (name, spec) pairs: one text as it is, named "" (a spec that names files, or whose start is not
    NAME=), or several named ones, NAME=TEXT,... as --data.mix names its sources (a text cannot contain ',')."""
    if not spec:
        return []
    name = spec.split(",")[0].partition("=")[0]
    if "=" not in spec or "/" in name or _names_files(spec):
        return [("", spec)]
    texts, seen = [], set()
    for entry in (e.strip() for e in spec.split(",")):
        name, eq, text = (part.strip() for part in entry.partition("="))
        if not (eq and name and text):
            raise UserError(f"--text entry {entry!r} is not NAME=TEXT: several texts are named each, e.g. "
                            "--text='web=held_out/web,code=held_out/code' (a text cannot contain ',').")
        if name in seen:
            raise UserError(f"--text names the text {name!r} twice; each text needs a name of its own.")
        seen.add(name)
        texts.append((name, text))
    return texts


def _names_files(spec: str) -> bool:
    path = paths.expand(spec)
    return path.exists() or (glob.has_magic(spec) and bool(glob.glob(paths.expand_text(spec), recursive=True)))


def text_files(name: str, spec: str) -> list:
    """The files of one --text, as gptjax.data.sources.corpus_files lists them; a prepared shard folder is refused."""
    option = f"--text {name}" if name else "--text"
    if read_meta(paths.expand(spec)) is not None:
        raise UserError(f"{option} {spec} is a folder of prepared shards (token ids, not text): give the corpus it "
                        "was prepared from, a file, a folder or a glob of text, JSON Lines or Parquet files.")
    return corpus_files(spec, option=option)


def overall(scores: list[TextScore]) -> dict:
    """Several texts' figures as one text's: the loss over all their tokens, bits per byte over all their bytes
    (each text's own weighted by its bytes)."""
    tokens, nbytes = sum(s.tokens for s in scores), sum(s.bytes for s in scores)
    nll = sum(s.loss * s.tokens for s in scores)
    return {"tokens": tokens, "bytes": nbytes, "documents": sum(s.documents for s in scores), "loss": nll / tokens,
            "perplexity": math.exp(nll / tokens), "bits_per_byte": nll / math.log(2) / nbytes if nbytes else None}
