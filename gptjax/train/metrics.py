"""What a run reports: FLOPs and MFU, the metrics.jsonl log (and TensorBoard events when
tensorboardX is installed, a W&B run with --train.wandb), and the progress display (a bar in a
terminal, plain lines in logs)."""

from __future__ import annotations

import json
import os
import sys
import threading
import weakref
import time
from pathlib import Path

from gptjax.runtime import disk
from gptjax.runtime.timing import fmt_time
from gptjax.config import ModelConfig

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets, by substrings of jax's device_kind.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6": 918e12}


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6 per weight (forward and backward) plus attention's scores and mixing.
    A lookup costs nothing: the position table, and the token embedding when the output layer is another."""
    lookups = cfg.block_size * (cfg.pos_encoding == "learned") + cfg.padded_vocab_size * (not cfg.tie_embeddings)
    n_matmul = n_params - lookups * cfg.n_embd
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short (a killed process, a full disk) is left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


_watched: weakref.WeakSet = weakref.WeakSet()
_failures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_hook_installed = False


def _watch(threads) -> None:
    """tensorboardX writes its files from a thread of its own, which a full disk ends with a traceback;
    every record added after that waits forever for it. Such an end is noted here, without the
    traceback, for MetricsLog.write to report as the disk's message."""
    global _hook_installed
    if not _hook_installed:
        _hook_installed = True
        previous = threading.excepthook

        def hook(args):
            if args.thread in _watched and disk.is_write_failure(args.exc_value):
                _failures[args.thread] = args.exc_value
            else:
                previous(args)

        threading.excepthook = hook
    _watched.update(threads)


class MetricsLog:
    """Appends JSON lines to metrics.jsonl and hands each record to the other logs (TensorBoard, W&B).

    On resume, lines past the checkpoint are dropped so that no step is logged twice. A full disk is
    reported as such, with `then` (what to do once it is fixed), and never leaves half a line.
    """

    def __init__(self, run_dir: Path, resume_step: int | None, others=(), then: str = "run the same command again"):
        self.path, self.then = run_dir / "metrics.jsonl", then
        keep = []
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        tmp = self.path.with_name(self.path.name + ".tmp")  # the old log stays whole if this cannot be written
        try:
            with disk.writing(self.path, "the metrics log", len(text), then=then):
                tmp.write_text(text)
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.others = [log for log in (TensorBoardLog.open(run_dir, resume_step, then), *others) if log is not None]

    def write(self, record: dict) -> None:
        line = memoryview((json.dumps(record) + "\n").encode())
        with disk.writing(self.path, "the metrics log", len(line), then=self.then):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    while line:
                        line = line[os.write(fd, line):]
                except OSError:
                    os.ftruncate(fd, start)  # no half line for a reader (or a resume) to trip on
                    raise
            finally:
                os.close(fd)
        for log in self.others:
            log.write(record)

    def close(self, failed: bool = False) -> None:
        for log in self.others:
            log.close(failed)


class TensorBoardLog:
    """Event files in <run_dir>/tensorboard/ when tensorboardX is installed (pip install "gptjax[tb]")."""

    QUEUE = 1024  # events waiting for the writer thread (tensorboardX's default: 10)

    def __init__(self, writer, threads: set, folder: Path, then: str):
        self.writer, self.threads, self.folder, self.then = writer, threads, folder, then

    @classmethod
    def open(cls, run_dir: Path, resume_step: int | None, then: str) -> TensorBoardLog | None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
        start, folder = resume_step or 0, run_dir / "tensorboard"
        before = set(threading.enumerate())
        # purge_step: TensorBoard hides what an interrupted run logged past the checkpoint it resumes from.
        # The file's name holds the second it was opened, so a suffix keeps two starts in one second apart.
        with disk.writing(folder, "the TensorBoard events", then=then):
            # a queue far longer than a record's figures: its writer thread may die (a full disk) between
            # write()'s check and the adds, and an add to a full queue whose reader is gone waits forever
            writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else start + 1,
                                   filename_suffix=f".from-step-{start:09d}", max_queue=cls.QUEUE)
        threads = {t for t in set(threading.enumerate()) - before  # the thread that writes its files
                   if type(t).__module__.startswith("tensorboardX")}
        _watch(threads)
        return cls(writer, threads, folder, then)

    def _alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def write(self, record: dict) -> None:
        if self.writer is not None and not self._alive():
            self.writer = None  # its writer thread is gone: a record added now would wait for it forever
            failure = next((_failures[t] for t in self.threads if t in _failures), None)
            if failure is not None:
                raise disk.write_error(failure, self.folder, "the TensorBoard events", then=self.then)
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def close(self, failed: bool = False) -> None:
        if self.writer is not None and self._alive():
            with disk.writing(self.folder, "the TensorBoard events", then=self.then):
                self.writer.close()


class Progress:
    """Step lines at intervals; in a terminal, a bar that redraws after every step instead."""

    def __init__(self, total: int, log=print, bar: bool | None = None):
        self.total, self.log = total, log
        self.bar = (log is print and sys.stdout.isatty()) if bar is None else bar
        self.drawn = False

    def line(self, message: str) -> None:
        """A line that stays (evaluations, checkpoints, warnings)."""
        if self.drawn:
            sys.stdout.write("\r\033[K")
            self.drawn = False
        self.log(message)

    def step(self, done: int, loss: float, bpb: float, rate: float, eta: float, lr: float, at_interval: bool) -> None:
        text = f"loss {loss:.4f} | {bpb:.3f} bits/byte | lr {lr:.2e} | {rate:,.0f} tok/s | left {fmt_time(eta)}"
        if self.bar:
            width = 24
            filled = int(width * done / max(self.total, 1))
            sys.stdout.write(f"\r\033[K{done:>6}/{self.total} [{'#' * filled}{'.' * (width - filled)}] {text}")
            sys.stdout.flush()
            self.drawn = True
        elif at_interval:
            self.log(f"step {done:>6} | {text}")


class Rate:
    """Tokens per second over the steps since the last reading (the first window includes compilation)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.start, self.steps, self.last = time.time(), 0, 0.0

    def tick(self) -> None:
        self.steps += 1

    def read(self, reset: bool) -> float:
        if self.steps:
            self.last = self.steps * self.tokens_per_step / max(time.time() - self.start, 1e-9)
        if reset:
            self.start, self.steps = time.time(), 0
        return self.last
