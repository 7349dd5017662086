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

A folder of prepared shards is scored on its validation split, its tokens as they are (in the
model's own tokenizer only): the same stream its documents' text would give, bytes counted from
the tokens. Several named texts are each scored alone; `overall` is all of them as one text.
"""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptjax import paths
from gptjax.data.mix import parse_mix
from gptjax.data.shards import open_folder, read_meta
from gptjax.data.sources import Problems, Reader, corpus_files
from gptjax.data.workers import encode_chunk
from gptjax.errors import UserError
from gptjax.model.score import Scorer, sliding_windows

SHARD_PIECE = 1 << 16  # tokens of a shard's validation split read at a time


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
    def pieces():
        for piece in reader:
            (ids, _), (nbytes, _) = encode_chunk(tokenizer.encoding, tokenizer.eot_id, np.int32,
                                                 [(piece.text, 0, piece.last)])
            yield ids, nbytes, piece.last

    return score_stream(scorer, pieces(), tokenizer.eot_id, stride,
                        lambda: reader.done_bytes() / max(reader.total_bytes, 1), progress)


def score_stream(scorer: Scorer, pieces, eot: int, stride: int, share: Callable[[], float],
                 progress: Callable[[int, float], None] | None = None) -> TextScore:
    """Score the token stream of `pieces`, (ids, the bytes of their text, the documents they end) in order,
    after one end-of-text; `share()`: how much of the input is read, for `progress`."""
    read = {"bytes": 0, "documents": 0}

    def chunks():
        yield np.array([eot], np.int32)
        for ids, nbytes, documents in pieces:
            read["bytes"] += nbytes
            read["documents"] += documents
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
                progress(tokens, share())
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


@dataclass(frozen=True)
class Text:
    """One text to score: the documents of corpus files, or the validation split of a folder of prepared shards."""
    name: str  # "" for the one unnamed --text
    spec: str
    files: tuple = ()
    shards: Path | None = None


def find_text(name: str, spec: str) -> Text:
    """One --text, checked: a folder with meta.json is prepared shards; anything else is what corpus_files takes."""
    option = f"--text {name}" if name else "--text"
    folder = paths.expand(spec)
    if (folder / "meta.json").is_file():
        return Text(name, spec, shards=folder)
    return Text(name, spec, files=tuple(corpus_files(spec, option=option)))


def mixture_texts(config, run_dir: Path) -> list[Text]:
    """--text=mix: each source of the run's --data.mix, by its name, as the validation split the run trained beside:
    a prepared source's own folder, a corpus's folder in <run_dir>/data/<NAME>."""
    if not config.data.mix:
        raise UserError(f"--text=mix scores the sources of a mixture's run, but {run_dir} was not trained on a "
                        "--data.mix; give the text to score: --text=FILE|FOLDER|GLOB or --text='NAME=TEXT,...'.")
    texts = []
    for source in parse_mix(config.data.mix):
        given = paths.expand(source.spec)
        folder = given if (given / "meta.json").is_file() else run_dir / "data" / source.name
        if not (folder / "meta.json").is_file():
            raise UserError(f"--text=mix: the shards of the mix source {source.name!r} ({source.spec}) are not in "
                            f"{folder} (a prepared source is read where the run read it, a path relative to where "
                            f"it started; a corpus in {run_dir / 'data' / source.name}). Name the texts instead: "
                            f"--text='{source.name}=...'.")
        texts.append(Text(source.name, str(folder), shards=folder))
    return texts


def score_shards(scorer: Scorer, text: Text, tokenizer, stride: int, progress=None) -> TextScore:
    """Score the validation split of a folder of prepared shards, in the model's tokenizer, as its documents' text
    would be scored: bytes from the tokens, a document ended by each end-of-text."""
    option = f"--text {text.name}" if text.name else "--text"
    meta = read_meta(text.shards)
    if meta is None:
        raise UserError(f"{option} {text.spec}: its meta.json cannot be read; prepare the folder again.")
    if meta.get("tokenizer") != tokenizer.name:
        raise UserError(f"{option} {text.spec} holds shards of the {meta.get('tokenizer')} tokenizer, but the model "
                        f"reads {tokenizer.name} tokens: give the corpus it was prepared from, which is tokenized "
                        "with the model's own tokenizer.")
    ds = open_folder(text.shards, meta)
    if not ds.tokenizer.same_as(tokenizer):
        raise UserError(f"{option} {text.spec} holds shards of another learned bpe tokenizer than the model's: give "
                        "the corpus it was prepared from, which is tokenized with the model's own tokenizer.")
    if not ds.val.size:
        raise UserError(f"{option} {text.spec} has no validation split (0 val tokens): give a corpus to score.")
    val, eot, done = ds.val, tokenizer.eot_id, [0]

    def pieces():
        for start in range(0, val.size, SHARD_PIECE):
            ids = val.window(start, SHARD_PIECE).astype(np.int32)
            done[0] = start + len(ids)
            yield ids, tokenizer.count_bytes(ids), int(np.count_nonzero(ids == eot))

    return score_stream(scorer, pieces(), eot, stride, lambda: done[0] / val.size, progress)


def overall(scores: list[TextScore]) -> dict:
    """Several texts' figures as one text's: the loss over all their tokens, bits per byte over all their bytes
    (each text's own weighted by its bytes)."""
    tokens, nbytes = sum(s.tokens for s in scores), sum(s.bytes for s in scores)
    nll = sum(s.loss * s.tokens for s in scores)
    return {"tokens": tokens, "bytes": nbytes, "documents": sum(s.documents for s in scores), "loss": nll / tokens,
            "perplexity": math.exp(nll / tokens), "bits_per_byte": nll / math.log(2) / nbytes if nbytes else None}
