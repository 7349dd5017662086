"""A full disk and other failed writes, wherever they happen (orbax and tensorstore, the data shards,
metrics, plots, conversion): recognised, and reported as one message with the path, the space needed
and the space free, never as the device running out of memory.

Orbax and tensorstore wrap the operating system's error in their own (a ValueError whose text says
RESOURCE_EXHAUSTED and "No space left on device"), so an error is recognised by its errno when it
has one and by that text when it does not.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from gptjax.errors import UserError

FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}
FAILED = {errno.EIO: "Input/output error", errno.EROFS: "Read-only file system"}


def _errno(error: BaseException) -> int | None:
    """The operating system's error number behind `error`, or None when it is not a storage failure."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno in {**FULL, **FAILED}:
            return e.errno
    text = str(error)
    for number, words in {**FULL, **FAILED}.items():
        if words in text or f"os_error_code='{number}'" in text:
            return number
    return None


def is_full(error: BaseException) -> bool:
    """No space (or no quota) left where `error` was writing."""
    return _errno(error) in FULL


def is_write_failure(error: BaseException) -> bool:
    """A full disk, an I/O error or a read-only file system: the storage failed, not the program or the input."""
    return _errno(error) is not None


def storage_failure(error: BaseException) -> str | None:
    """The system's words for the storage failure behind `error` ("Input/output error", ...), or None."""
    number = _errno(error)
    return None if number is None else {**FULL, **FAILED}[number]


def free_bytes(path: str | Path) -> int | None:
    """Bytes that an ordinary process can still write on the file system holding `path` (or its nearest
    existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def used_bytes(folder: str | Path) -> int:
    """What the files under `folder` occupy on its disk (allocated blocks, not their lengths)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # removed meanwhile
                pass
    return total


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} bytes"


def write_error(error: BaseException, path: str | Path, what: str, needed: int | None = None, done: str = "",
                then: str = "run the same command again") -> UserError:
    """The message for a failed write of `what` into `path`: how much it needs and how much is free when
    the disk is full, the system's reason otherwise; `done` says what was cleaned up or kept, `then`
    what to do once the disk is fixed."""
    number = _errno(error)
    free = free_bytes(path)
    done = f" {done.strip()}" if done else ""
    if number in FULL:
        need = f"needs about {fmt_bytes(needed)}, and " if needed is not None else "failed: "
        return UserError(f"the disk is full: writing {what} to {path} {need}{fmt_bytes(free)} "
                         f"is free there ({FULL[number]}).{done} Free some space "
                         f"on that disk (or choose a folder on a larger one), then {then}.")
    reason = FAILED.get(number) or (os.strerror(number) if number else str(error).splitlines()[0][:200])
    return UserError(f"writing {what} to {path} failed: {reason}.{done} Check that disk (is it mounted "
                     f"writable? `dmesg` may say more), then {then}.")


@contextlib.contextmanager
def writing(path: str | Path, what: str, needed: int | None = None, then: str = "run the same command again"):
    """Turn a storage failure inside the block into write_error's message; other errors pass through."""
    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise write_error(e, path, what, needed, then=then) from None


def warn_if_short(path: str | Path, needed: int, what: str, log) -> bool:
    """Say so (and return True) when the disk holding `path` has less than `needed` bytes free."""
    free = free_bytes(path)
    if free is None or free >= needed:
        return False
    log(f"warning: {path} is on a disk with {fmt_bytes(free)} free, but {what} need about {fmt_bytes(needed)}; "
        "free some space or choose an --out_dir on a larger disk, or training will stop when the disk fills")
    return True
