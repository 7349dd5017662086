"""Tokenization on every core: worker processes that turn chunks of text into token arrays.

Each worker is a fresh interpreter running `serve`, neither a fork nor a
multiprocessing spawn: a fork would copy the caller's JAX runtime and its threads, and a spawn
re-runs the caller's main module (train.py, or a user's script without a main guard). The pool
sends the tiktoken encoding once, then chunks round robin, `DEPTH` to each worker ahead, so a
worker always has its next chunk at hand while its parent reads, writes and sends; results come
back in the order the chunks went out. A worker reads its input and writes its results in threads
of their own (tiktoken releases the GIL while it encodes), so neither side ever waits on a full
pipe. A worker ignores Ctrl-C (its parent decides what a stop means) and ends when its input
closes, so it never outlives a parent that was killed.
"""

from __future__ import annotations

import os
import pickle
import signal
import queue
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from gptjax.runtime.malloc import return_large_blocks

# A chunk is a list of pieces: (text, split, ends_document), split 0 for train and 1 for validation.
# Its result: the token ids of each split (documents followed by end-of-text) and their UTF-8 bytes.


def encode_chunk(encoding, eot_id: int, dtype, pieces) -> tuple[tuple[np.ndarray, np.ndarray], tuple[int, int]]:
    ids, nbytes = ([], []), [0, 0]
    end = np.array([eot_id], dtype)
    for text, split, ends in pieces:
        try:
            tokens = encoding.encode_to_numpy(text, disallowed_special=())  # special-token text is plain text
        except UnicodeEncodeError:  # lone surrogates (from JSON escapes) become U+FFFD, as tiktoken's encode() does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            tokens = encoding.encode_to_numpy(text, disallowed_special=())
        ids[split].append(tokens.astype(dtype))
        if ends:
            ids[split].append(end)
        nbytes[split] += len(text.encode("utf-8"))
    arrays = tuple(np.concatenate(x) if x else np.zeros(0, dtype) for x in ids)
    return arrays, (nbytes[0], nbytes[1])


DEPTH = 2  # chunks sent ahead to each worker


def peak_rss(pid: int | str = "self") -> int:
    """A process's peak resident memory in bytes, from /proc (VmHWM: unlike getrusage's ru_maxrss, it
    does not carry the parent's peak over a fork and exec); 0 where /proc does not say."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class WorkerError(RuntimeError):
    pass


class TokenizerPool:
    """`map` tokenizes chunks in order, in `workers` processes (in this process when 1)."""

    def __init__(self, encoding, eot_id: int, dtype, workers: int):
        self.encoding, self.eot_id, self.dtype = encoding, eot_id, np.dtype(dtype)
        self.procs: list[subprocess.Popen] = []
        self.worker_peak = 0
        if workers > 1:
            env = dict(os.environ)
            package_root = str(Path(__file__).resolve().parents[2])  # importable even from a source checkout
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
            setup = pickle.dumps((encoding, eot_id, self.dtype.str), protocol=pickle.HIGHEST_PROTOCOL)
            for _ in range(workers):
                proc = subprocess.Popen([sys.executable, "-c", "from gptjax.data.workers import serve; serve()"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                self.procs.append(proc)
                proc.stdin.write(setup)
                proc.stdin.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(graceful=exc[0] is None)

    def _send(self, w: int, chunk) -> None:
        try:
            pickle.dump(chunk, self.procs[w].stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.procs[w].stdin.flush()
        except BrokenPipeError:
            raise self._died(w) from None

    def _receive(self, w: int):
        try:
            status, value = pickle.load(self.procs[w].stdout)
        except (EOFError, pickle.UnpicklingError):
            raise self._died(w) from None
        if status != "ok":
            raise WorkerError(f"a tokenizer worker failed:\n{value}")
        return value

    def _died(self, w: int) -> WorkerError:
        code = self.procs[w].wait()
        why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return WorkerError(f"a tokenizer worker process ended unexpectedly ({why}; out of memory?). What was "
                           "prepared so far is kept: run the same command again to continue.")

    def map(self, chunks: Iterable) -> Iterator[tuple[object, tuple]]:
        """(chunk, result) in the order of `chunks`; `chunk` is what was given, `result` its tokens."""
        if not self.procs:
            for chunk in chunks:
                yield chunk, encode_chunk(self.encoding, self.eot_id, self.dtype, chunk.pieces)
            return
        chunks = iter(chunks)
        in_flight = deque()
        for k in range(DEPTH * len(self.procs)):
            chunk = next(chunks, None)
            if chunk is None:
                break
            self._send(k % len(self.procs), chunk.pieces)
            in_flight.append((k % len(self.procs), chunk))
        while in_flight:
            w, chunk = in_flight.popleft()
            result = self._receive(w)
            upcoming = next(chunks, None)
            if upcoming is not None:
                self._send(w, upcoming.pieces)
                in_flight.append((w, upcoming))
            yield chunk, result

    def peak_rss(self) -> int:
        """The largest worker's peak resident memory in bytes (0 where /proc does not say)."""
        return max((peak_rss(p.pid) for p in self.procs), default=0)

    def close(self, graceful: bool = True) -> None:
        self.worker_peak = self.peak_rss()
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10 if graceful else 0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self.procs = []


def serve() -> None:
    """The worker: read the setup, then tokenize chunk after chunk until the input closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return_large_blocks()
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not enter the result stream
    source = sys.stdin.buffer
    encoding, eot_id, dtype = pickle.load(source)
    inbox, outbox = queue.Queue(), queue.Queue()

    def read():
        while True:
            try:
                inbox.put(pickle.load(source))
            except (EOFError, pickle.UnpicklingError, OSError):
                # the input ended: closed between chunks (EOF), or cut inside one by a parent killed while it
                # wrote (a truncated pickle); either way no more work comes, and the worker must end
                inbox.put(None)
                return

    def write():
        while (reply := outbox.get()) is not None:
            pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()

    threading.Thread(target=read, daemon=True).start()
    writer = threading.Thread(target=write)
    writer.start()
    while (pieces := inbox.get()) is not None:
        try:
            outbox.put(("ok", encode_chunk(encoding, eot_id, np.dtype(dtype), pieces)))
        except Exception:  # noqa: BLE001  reported to the parent, which stops the preparation
            import traceback
            outbox.put(("error", traceback.format_exc()))
    outbox.put(None)
    writer.join()
