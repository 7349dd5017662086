"""Corpus → token shards (train.bin, val.bin, meta.json) → deterministic batches.

A corpus is a text file, a folder (every non-hidden file under it) or a glob; empty means
the Python standard library's own source, found through `sysconfig`. Each file is a
document, followed by end-of-text. The token stream is cut into chunks and every k-th
chunk goes to validation, so both splits sample the whole corpus. Batches are a pure
function of (seed, step): a resumed run reads exactly what it would have read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptjax.config import DataConfig
from gptjax.errors import UserError
from gptjax.tokenizer import get_tokenizer

FORMAT_VERSION = 1
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def corpus_files(spec: str) -> list[Path]:
    """The files a corpus spec names, sorted; a clear error when it names none."""
    if not spec:
        files = stdlib_files()
        if not files:
            raise UserError("found no Python standard library source through sysconfig; give --data.corpus=PATH.")
        return files
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"corpus folder {spec} holds no files. Give a text file, a folder of text files or a glob.")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"corpus glob {spec!r} matches no files.")
        return files
    raise UserError(f"corpus {spec} does not exist. Give a text file, a folder or a glob (e.g. 'texts/**/*.txt'), "
                    "or leave --data.corpus empty for the Python standard library's source.")


def _fingerprint(files: list[Path], tokenizer: str, val_fraction: float) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{tokenizer}|{val_fraction}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _read_documents(files: list[Path], skip_binary: bool):
    """Decode files as UTF-8; undecodable bytes become U+FFFD and are counted."""
    texts, replaced, skipped = [], 0, []
    for f in files:
        raw = f.read_bytes()
        if skip_binary and b"\x00" in raw[:8192]:
            skipped.append(f)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            replaced += text.count("\ufffd") - raw.count("\ufffd".encode())
        if text:
            texts.append(text)
    return texts, replaced, skipped


def _split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Every k-th chunk to validation, evenly spread; at least one chunk when there are two."""
    chunk = int(np.clip(len(tokens) // 64, 64, 8192))
    n_chunks = -(-len(tokens) // chunk)
    n_val = min(max(1, round(n_chunks * val_fraction)), n_chunks - 1)
    val_chunks = ((np.arange(n_val) + 0.5) * n_chunks / max(n_val, 1)).astype(np.int64)
    is_val = np.isin(np.arange(len(tokens)) // chunk, val_chunks)
    return tokens[~is_val], tokens[is_val]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Dataset:
    train: np.ndarray
    val: np.ndarray
    meta: dict


def _load(data_dir: Path, meta: dict) -> Dataset:
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(data_dir / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(data_dir / "val.bin", dtype=dtype, mode="r")
    return Dataset(train, val, meta)


def prepare(cfg: DataConfig, data_dir: str | Path, log=print, shared: bool = False) -> Dataset:
    """Tokenize the corpus into `data_dir` once; reuse the shards while corpus and tokenizer stay the same.

    A `shared` folder (named by --data.dir, perhaps used by other runs) holding shards of another
    tokenizer is refused rather than overwritten.
    """
    data_dir = Path(data_dir)
    files = corpus_files(cfg.corpus)
    fingerprint = _fingerprint(files, cfg.tokenizer, cfg.val_fraction)
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("fingerprint") == fingerprint:
            log(f"data: reusing {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {data_dir}")
            return _load(data_dir, meta)
        if meta and shared and meta.get("tokenizer") != cfg.tokenizer:
            raise UserError(f"{data_dir} holds token shards of the {meta.get('tokenizer')} tokenizer, but this run "
                            f"uses {cfg.tokenizer}. Give another --data.dir (or leave it empty for <out_dir>/data), "
                            f"or --data.tokenizer={meta.get('tokenizer')}; the shards were left as they are.")
        if meta:
            why = ("tokenizer changed" if meta.get("tokenizer") != cfg.tokenizer else "corpus changed")
            log(f"data: {why} since {data_dir} was prepared; tokenizing again")

    tok = get_tokenizer(cfg.tokenizer)
    texts, replaced, skipped = _read_documents(files, skip_binary=len(files) > 1)
    if skipped:
        log(f"warning: skipped {len(skipped)} binary file(s), e.g. {skipped[0]}")
    if replaced:
        log(f"warning: {replaced:,} undecodable byte(s) in the corpus were replaced by U+FFFD")
    if not texts:
        raise UserError(f"corpus {cfg.corpus or 'stdlib'} is empty: its {len(files)} file(s) hold no text.")
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    ids = tok.encode_batch(texts)
    tokens = np.concatenate([np.append(np.asarray(d, dtype=dtype), dtype(tok.eot_id)) for d in ids])
    train, val = _split(tokens, cfg.val_fraction)

    data_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(data_dir / "train.bin", train.tobytes())
    _write_atomic(data_dir / "val.bin", val.tobytes())
    meta = {
        "format": FORMAT_VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
        "dtype": np.dtype(dtype).name, "source": cfg.corpus or "stdlib:" + sysconfig.get_paths()["stdlib"],
        "files": len(files), "documents": len(texts), "skipped_files": len(skipped), "replaced_bytes": replaced,
        "train_tokens": int(train.size), "val_tokens": int(val.size), "val_fraction": cfg.val_fraction,
        "fingerprint": fingerprint,
    }
    _write_atomic(meta_path, json.dumps(meta, indent=2).encode())
    log(f"data: {len(texts):,} documents → {train.size:,} train / {val.size:,} val {tok.name} tokens in {data_dir}")
    return Dataset(train, val, meta)


def check_fits(ds: Dataset, block_size: int) -> None:
    """Every split must hold at least one context window plus its next-token target."""
    need = block_size + 1
    for name, split in (("train", ds.train), ("validation", ds.val)):
        if split.size < need:
            raise UserError(
                f"the corpus is too small for the context: the {name} split holds {split.size:,} tokens, "
                f"fewer than block_size + 1 = {need:,}. Use a larger corpus, a smaller --model.block_size"
                + (" or a larger --data.val_fraction." if name == "validation" else ".")
            )


def batch_offsets(n_tokens: int, block_size: int, seed: int, stream: int, index: int, count: int) -> np.ndarray:
    """Start offsets of `count` windows: a pure function of (seed, stream, index)."""
    rng = np.random.default_rng([seed, stream, index])
    return rng.integers(0, n_tokens - block_size, size=count)


def get_batch(tokens: np.ndarray, block_size: int, offsets: np.ndarray):
    """Inputs and next-token targets (int32) for windows at `offsets`, shaped like `offsets` + (T,)."""
    flat = offsets.reshape(-1)
    window = np.stack([np.asarray(tokens[o:o + block_size + 1], dtype=np.int32) for o in flat])
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
