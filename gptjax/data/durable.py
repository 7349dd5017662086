"""What lets a preparation stop at any moment and go on: files replaced whole and synced, folders synced,
SIGTERM taken as Ctrl-C, and one preparer per folder."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

from gptjax.runtime import disk, locks


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


@contextlib.contextmanager
def sigterm_stops():
    """SIGTERM ends the preparation as Ctrl-C does: what is written is committed first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def locked(folder: Path, log) -> locks.DirectoryLock:
    """One preparation per folder at a time; a second waits for the first (then reuses its work)."""
    with disk.writing(folder, "the shard folder's lock file"):
        return locks.acquire(folder, "preparing token shards", wait=True,
                             on_wait=lambda holder: log(f"data: {holder.describe()} is preparing {folder}; "
                                                        "waiting for it"))
