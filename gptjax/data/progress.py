"""What a preparation of token shards tells as it goes: a progress bar in a terminal (a line now and
then elsewhere) while the corpus is tokenized, and the closing report of what was made, how fast,
and the problems the reader met.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gptjax.data.sources import Problems
from gptjax.runtime import disk
from gptjax.runtime.timing import fmt_time


class Progress:
    """In a terminal a bar redrawn as work is done; elsewhere a line every `interval` seconds."""

    def __init__(self, total_bytes: int, log, interval: float = 10.0):
        self.total, self.log = max(total_bytes, 1), log
        self.bar = log is print and sys.stdout.isatty()
        self.interval = 0.25 if self.bar else interval
        self.start = self.last = time.time()

    def update(self, done_bytes: int, text_bytes: int, tokens: int) -> None:
        now = time.time()
        if now - self.last < self.interval:
            return
        self.last = now
        frac, elapsed = min(done_bytes / self.total, 1.0), now - self.start
        left = elapsed * (1 - frac) / frac if frac > 0 else 0
        text = (f"{frac:4.0%} of {self.total / 1e6:,.0f} MB | {text_bytes / elapsed / 1e6:5.1f} MB/s | "
                f"{tokens:,} tokens | left {fmt_time(left)}")
        if self.bar:
            width = 24
            filled = int(width * frac)
            sys.stdout.write(f"\r\033[Kdata [{'#' * filled}{'.' * (width - filled)}] {text}")
            sys.stdout.flush()
        else:
            self.log(f"data: {text}")

    def close(self) -> None:
        if self.bar:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()


def report(meta: dict, folder: Path, took: float | None, text_bytes: int, workers: int, log) -> None:
    """The closing lines of a preparation (`meta`, meta.json's content, of shards in `folder`): what was
    made and, when it tokenized (`took` seconds, `text_bytes` of text), how fast; then what it met."""
    text_mb = (meta["train_bytes"] + meta["val_bytes"]) / 1e6
    speed = (f" in {fmt_time(took)} ({text_bytes / max(took, 1e-9) / 1e6:.1f} MB/s, {workers} worker"
             f"{'s' if workers > 1 else ''})" if took is not None else "")
    split = {"tail": f" (too few documents to hold whole ones out: validation is the text's last "
                     f"{disk.fmt_bytes(meta['val_bytes'])}, cut off before tokenizing)",
             "val_corpus": " (validation from --data.val_corpus)"}.get(meta["split"], "")
    log(f"data: {meta['documents']:,} documents, {text_mb:,.1f} MB of text from {meta['files'] + meta['val_files']:,} "
        f"file(s) → {meta['train_tokens']:,} train / {meta['val_tokens']:,} val {meta['tokenizer']} tokens in "
        f"{folder}{speed}{split}")
    for line in Problems(meta["problems"]).lines():
        log(f"warning: {line}")
