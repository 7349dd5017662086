"""Token shards on disk, read as one stream, and the batches drawn from them.

A shard folder holds
  train.bin, val.bin   token ids, little-endian, of meta.json's dtype; each document is followed by
                       the end-of-text id
  meta.json            written last: its presence says the folder is complete. The fields a reader
                       needs: format, tokenizer, dtype, eot_id, train_tokens, val_tokens.
Any program may write such a folder; a run reads one folder or several (a cluster can prepare
disjoint parts of a corpus on many machines), their splits read end to end as one stream each.
Batches are a pure function of (seed, step): a resumed run reads exactly what it would have read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptjax import paths
from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer, bpe_tokenizer, get_tokenizer

FORMAT_VERSION = 2
META_FIELDS = ("format", "tokenizer", "dtype", "eot_id", "train_tokens", "val_tokens")
SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.tiktoken"  # a learned bpe's merge ranks, beside the shards it made


class TokenStream:
    """Token ids of several files read as one sequence (memory-mapped, never loaded)."""

    def __init__(self, parts):
        self.parts = [np.asarray(p) if not isinstance(p, np.memmap) else p for p in parts]
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)
        self.size = int(self.ends[-1]) if len(self.parts) else 0
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.size

    def window(self, start: int, length: int) -> np.ndarray:
        """`length` ids from `start`, across file boundaries where the window spans them."""
        i = int(np.searchsorted(self.ends, start, side="right"))
        offset = start - (int(self.ends[i - 1]) if i else 0)
        first = self.parts[i][offset:offset + length]
        if len(first) == length or i + 1 == len(self.parts):
            return np.asarray(first)
        pieces, need = [first], length - len(first)
        while need and i + 1 < len(self.parts):
            i += 1
            pieces.append(self.parts[i][:need])
            need -= len(pieces[-1])
        return np.concatenate(pieces)

    def to_numpy(self) -> np.ndarray:
        """The whole stream in memory: for small data (tests, notebooks)."""
        return np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)


@dataclass
class Dataset:
    train: TokenStream
    val: TokenStream
    meta: dict = field(default_factory=dict)
    tokenizer: Tokenizer | None = None

    def __post_init__(self):
        if not isinstance(self.train, TokenStream):
            self.train = TokenStream([self.train])
        if not isinstance(self.val, TokenStream):
            self.val = TokenStream([self.val])


def read_meta(folder: Path) -> dict | None:
    """The folder's meta.json if it is there and readable, else None (not prepared, or not finished)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def check_meta(folder: Path, meta: dict) -> None:
    """A folder's meta.json names every field a reader needs, and its files hold what it says."""
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise UserError(f"{folder}/meta.json lacks {', '.join(missing)}; a shard folder's meta.json names "
                        f"{', '.join(META_FIELDS)} (see the README's shard format).")
    if meta["format"] > FORMAT_VERSION:
        raise UserError(f"{folder} holds shards of format {meta['format']}, newer than this gptjax reads "
                        f"({FORMAT_VERSION}); upgrade gptjax or prepare the corpus again.")
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
    except TypeError:
        raise UserError(f"{folder}/meta.json names dtype {meta['dtype']!r}; use uint16 or uint32.") from None
    for split in SPLITS:
        path, want = folder / f"{split}.bin", int(meta[f"{split}_tokens"]) * itemsize
        have = path.stat().st_size if path.is_file() else None
        if have != want:
            raise UserError(f"{path} {'is missing' if have is None else f'holds {have:,} bytes'}, but meta.json "
                            f"says {meta[f'{split}_tokens']:,} {meta['dtype']} tokens ({want:,} bytes): the folder "
                            "is damaged or was changed after it was prepared. Prepare it again.")


def folder_tokenizer(folder: Path, meta: dict) -> Tokenizer:
    """The tokenizer that made a folder's shards: by name, or a learned bpe from the file beside them."""
    if meta["tokenizer"] != "bpe":
        return get_tokenizer(meta["tokenizer"])
    path = folder / meta.get("tokenizer_file", TOKENIZER_FILE)
    if not path.is_file():
        raise UserError(f"{folder} holds shards of a learned bpe tokenizer, but its {path.name} is missing; "
                        "prepare the folder again.")
    return bpe_tokenizer(path.read_text())


def open_folder(folder: Path, meta: dict) -> Dataset:
    check_meta(folder, meta)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")

    def part(split):
        n = int(meta[f"{split}_tokens"])
        return np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r") if n else np.zeros(0, dtype)

    return Dataset(TokenStream([part("train")]), TokenStream([part("val")]), meta, folder_tokenizer(folder, meta))


def shard_folders(spec: str) -> list[Path]:
    """The folders a --data.dir names: one folder, several separated by commas, or globs."""
    folders = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if glob.has_magic(item):
            matched = sorted(Path(p) for p in glob.glob(paths.expand_text(item)) if os.path.isdir(p))
            if not matched:
                raise UserError(f"--data.dir glob {item!r} matches no folders.")
            folders += matched
        else:
            folders.append(paths.expand(item))
    return folders


def open_folders(folders: list[Path], tokenizer: str) -> Dataset:
    """Prepared folders read as one data set: each split end to end, in the order given."""
    sets = []
    for folder in folders:
        meta = read_meta(folder)
        if meta is None and (folder / "meta.json").exists():
            raise UserError(f"{folder}/meta.json is there but is not a JSON object that can be read: the folder "
                            "is damaged. Prepare it again (python -m gptjax.data prepare --data.corpus=... "
                            f"--data.dir={folder}), or restore its meta.json.")
        if meta is None:
            raise UserError(f"{folder} holds no prepared shards (no meta.json). Prepare it first: python -m "
                            f"gptjax.data prepare --data.corpus=... --data.dir={folder}")
        if meta["tokenizer"] != tokenizer:
            raise UserError(f"{folder} holds token shards of the {meta['tokenizer']} tokenizer, but this run uses "
                            f"{tokenizer}. Give folders of one tokenizer, or --data.tokenizer={meta['tokenizer']}; "
                            "the shards were left as they are.")
        sets.append(open_folder(folder, meta))
    if len(sets) == 1:
        return sets[0]
    if any(not s.tokenizer.same_as(sets[0].tokenizer) for s in sets):
        raise UserError("the folders hold shards of different learned bpe tokenizers (each was learned from its own "
                        "part of the corpus), so their token ids do not mean the same. Use --data.tokenizer=gpt2 or "
                        "byte for folders prepared apart.")
    dtypes = {s.meta["dtype"] for s in sets}
    if len(dtypes) > 1:
        raise UserError(f"the folders hold tokens of different dtypes ({', '.join(sorted(dtypes))}); prepare them "
                        "with one tokenizer.")
    metas = [s.meta for s in sets]
    meta = {
        "format": FORMAT_VERSION, "tokenizer": tokenizer, "dtype": metas[0]["dtype"], "eot_id": metas[0]["eot_id"],
        "folders": [str(f) for f in folders], "source": [m.get("source", str(f)) for m, f in zip(metas, folders)],
        "fingerprint": hashlib.sha256("|".join(m.get("fingerprint", f"{f}:{m['train_tokens']}")
                                               for m, f in zip(metas, folders)).encode()).hexdigest(),
    }
    for key in ("train_tokens", "val_tokens", "train_bytes", "val_bytes", "documents"):
        if all(key in m for m in metas):
            meta[key] = sum(int(m[key]) for m in metas)
    train = TokenStream([p for s in sets for p in s.train.parts if len(p)])
    val = TokenStream([p for s in sets for p in s.val.parts if len(p)])
    return Dataset(train, val, meta, sets[0].tokenizer)


def check_fits(ds: Dataset, block_size: int) -> None:
    """Every split must hold at least one context window plus its next-token target."""
    need = block_size + 1
    for name, split in (("train", ds.train), ("validation", ds.val)):
        if split.size < need:
            raise UserError(
                f"the corpus is too small for the context: the {name} split holds {split.size:,} tokens, "
                f"fewer than block_size + 1 = {need:,}. Use a larger corpus, a smaller --model.block_size"
                + (", a larger --data.val_fraction or a --data.val_corpus." if name == "validation" else ".")
            )


def batch_offsets(n_tokens: int, block_size: int, seed: int, stream: int, index: int, count: int) -> np.ndarray:
    """Start offsets of `count` windows: a pure function of (seed, stream, index)."""
    rng = np.random.default_rng([seed, stream, index])
    return rng.integers(0, n_tokens - block_size, size=count)


def get_batch(tokens: TokenStream, block_size: int, offsets: np.ndarray):
    """Inputs and next-token targets (int32) for windows at `offsets`, shaped like `offsets` + (T,)."""
    flat = offsets.reshape(-1)
    window = np.stack([tokens.window(int(o), block_size + 1).astype(np.int32) for o in flat])
    window = window.reshape(*offsets.shape, block_size + 1)
    return window[..., :-1], window[..., 1:]


TRAIN_STREAM, VAL_STREAM = 0, 1


def train_batch(ds: Dataset, block_size: int, seed: int, step: int, grad_accum: int, batch_size: int,
                rows: slice = slice(None)):
    """The global batch of optimizer step `step`: (grad_accum, batch_size, T) inputs and targets.

    `rows` reads only those rows of every micro-batch: one process's part of the global batch.
    """
    offsets = batch_offsets(ds.train.size, block_size, seed, TRAIN_STREAM, step, grad_accum * batch_size)
    return get_batch(ds.train, block_size, offsets.reshape(grad_accum, batch_size)[:, rows])


def val_batch(ds: Dataset, block_size: int, seed: int, index: int, batch_size: int, rows: slice = slice(None)):
    """Validation batch `index` (its `rows`); the same batches at every evaluation, so losses compare."""
    offsets = batch_offsets(ds.val.size, block_size, seed, VAL_STREAM, index, batch_size)
    return get_batch(ds.val, block_size, offsets[rows])
