"""Data: a corpus of text, JSON Lines or Parquet files (compressed or not) → token shards → batches.

  sources   corpus spec → files → documents, read as a stream, in pieces
  workers   tokenizer worker processes, one per core
  pipeline  the streamed, resumable preparation of a shard folder
  progress  what a preparation tells: its progress line and closing report
  shards    the shard format, one or several folders read as one, and batches
  mix       a mixture's weights, schedule and the draw of each batch's rows from its sources
  mixture   a mixture's sources read from disk: prepared with one tokenizer, and their batches
  align     training windows that start at a document's start (--data.align=bos), packed best-fit

`load` is what a run calls: it prepares (or reuses) the corpus, or reads prepared folders as they are.
"""

from __future__ import annotations

import glob
from pathlib import Path

from gptjax.config import DataConfig
from gptjax.data import align
from gptjax.data.pipeline import prepare
from gptjax.data.shards import (Dataset, TokenStream, batch_offsets, check_fits, get_batch, open_folders,
                                read_meta, shard_folders, train_batch, val_batch)
from gptjax.data.sources import corpus_files, stdlib_files
from gptjax.errors import UserError

__all__ = ["Dataset", "TokenStream", "align", "batch_offsets", "check_fits", "corpus_files", "get_batch", "load",
           "prepare", "stdlib_files", "train_batch", "val_batch"]


def load(cfg: DataConfig, default_dir: Path, log=print, tokenizer=None) -> Dataset:
    """The run's data. Without --data.dir: the corpus, prepared (or reused) in `default_dir`. With one
    folder: the corpus prepared there, or with no --data.corpus the folder's shards as they are. With
    several folders (commas or a glob): their shards, as they are, read as one. `tokenizer`: a learned
    bpe to prepare with (a fine-tune's source's) instead of learning one."""
    if not cfg.dir:
        return prepare(cfg, default_dir, log, tokenizer=tokenizer)
    folders = shard_folders(cfg.dir)
    if not folders:
        raise UserError(f"--data.dir={cfg.dir!r} names no folder.")
    if len(folders) > 1 or glob.has_magic(cfg.dir) or "," in cfg.dir:
        if cfg.corpus or cfg.val_corpus:
            raise UserError("several --data.dir folders are read as they are, so --data.corpus and "
                            "--data.val_corpus must be empty: prepare each folder first with python -m gptjax.data "
                            "prepare --data.corpus=... --data.dir=FOLDER.")
        ds = open_folders(folders, cfg.tokenizer)
        log(f"data: {ds.train.size:,} train / {ds.val.size:,} val tokens from {len(folders)} folder(s) "
            f"({', '.join(map(str, folders[:3]))}{', ...' if len(folders) > 3 else ''})")
        return ds
    folder = folders[0]
    if not cfg.corpus and not cfg.val_corpus and read_meta(folder) is not None:
        ds = open_folders([folder], cfg.tokenizer)
        log(f"data: {ds.train.size:,} train / {ds.val.size:,} val tokens in {folder} (prepared from "
            f"{ds.meta.get('source', 'elsewhere')})")
        return ds
    return prepare(cfg, folder, log, shared=True, tokenizer=tokenizer)
