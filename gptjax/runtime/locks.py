"""One writer per directory: an exclusive lock on `<folder>/.lock`, held for as long as the writer runs.

The lock is flock(2) on that file. The kernel ties it to the open file, so it goes away with the
process however that ends (exit, exception, SIGKILL, the OOM killer): a killed writer never leaves
a stale lock that someone must delete by hand. The holder writes who it is into the file (pid, host,
start time, command line), so that a process refused the lock can name the one that has it.

Only writers lock. Readers (gptjax.load, sample.py, conversion) never do: they open complete
checkpoints, which a writer renames into place and never changes afterwards.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LOCK_FILE = ".lock"

_held: dict[str, "DirectoryLock"] = {}  # folders this process holds: taking one again is a no-op


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as the holder wrote it into the lock file."""

    pid: int | None = None
    host: str = ""
    started: float | None = None
    command: str = ""
    what: str = ""

    def describe(self) -> str:
        if self.pid is None:
            return "another process (it has not yet written who it is)"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "?"
        doing = f", {self.what}" if self.what else ""
        command = f": {self.command}" if self.command else ""
        return f"process {self.pid} on host {self.host}, started {when}{doing}{command}"


class Locked(Exception):
    """The folder's lock is held by another process."""

    def __init__(self, folder: Path, holder: Holder):
        super().__init__(f"{folder} is locked by {holder.describe()}")
        self.folder, self.holder = folder, holder


class DirectoryLock:
    """A held lock; release() (or the process's end) gives it up. `unsupported` says why a file
    system that cannot lock (some network file systems) left the folder unlocked."""

    def __init__(self, folder: Path, fd: int | None, created_folder: bool, unsupported: str = ""):
        self.folder, self._fd, self._created_folder = folder, fd, created_folder
        self.unsupported = unsupported

    def release(self) -> None:
        if self._fd is None:
            return
        _held.pop(str(self.folder.resolve()), None)
        # removed while still held: a process waiting on this file notices that it is gone and opens the new one
        (self.folder / LOCK_FILE).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created_folder:  # a run that stopped before writing anything leaves no empty folder behind
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(folder: Path) -> Holder:
    """Who holds (or last held) the lock of `folder`; empty fields when it cannot be told."""
    try:
        info = json.loads((Path(folder) / LOCK_FILE).read_text())
        return Holder(**{k: info.get(k) for k in ("pid", "host", "started", "command", "what")})
    except (OSError, ValueError, TypeError):
        return Holder()


def acquire(folder: str | Path, what: str, wait: bool = False,
            on_wait: Callable[[Holder], None] | None = None) -> DirectoryLock:
    """Take the lock of `folder` (created if missing) for `what` ("training", say).

    Held by another process: raise Locked naming it, or with `wait`, call `on_wait(holder)` and
    wait until it is free. Taking a lock this process already holds returns a lock that releases nothing.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if str(folder.resolve()) in _held:
        return DirectoryLock(folder, None, False)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_of(folder)
            if not wait:
                os.close(fd)
                raise Locked(folder, holder) from None
            if on_wait is not None:
                on_wait(holder)
                on_wait = None
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: a file system without flock (Lustre without -o flock)
            os.close(fd)
            path.unlink(missing_ok=True)
            return DirectoryLock(folder, None, created, unsupported=f"{e.strerror} (errno {e.errno})")
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file as it released it: lock the one that is there now
    lock = DirectoryLock(folder, fd, created)
    _write_holder(fd, what)
    _held[str(folder.resolve())] = lock
    return lock


def _holder_of(folder: Path) -> Holder:
    """The holder writes its details just after it takes the lock: give it a moment."""
    for _ in range(20):
        holder = read_holder(folder)
        if holder.pid is not None:
            return holder
        time.sleep(0.05)
    return holder


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _write_holder(fd: int, what: str) -> None:
    command = " ".join([os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": what,
            "command": command if len(command) <= 160 else command[:159] + "…"}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, only a refused process cannot name its holder
