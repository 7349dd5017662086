"""Paths as a person gives them: relative to the working directory, or under ~ (which the shell leaves
alone in `--out_dir=~/run`). Every option and function that takes a path expands it with these;
a library that refuses relative paths (orbax-checkpoint) gets `absolute` at the call.

Paths stay relative otherwise, so that a message names a path as it was typed; nothing is resolved,
so a run directory reached through a symbolic link keeps its name.
"""

from __future__ import annotations

import os
from pathlib import Path


def expand(path: str | os.PathLike) -> Path:
    """`path` with a leading ~ (or ~user) replaced by that home folder."""
    return Path(path).expanduser()


def absolute(path: str | os.PathLike) -> Path:
    """`path` expanded and anchored at the working directory, for libraries that take only absolute paths."""
    return expand(path).absolute()


def expand_text(text: str) -> str:
    """A path or a glob, as text, with its leading ~ expanded and nothing else changed (glob.glob, and an
    option's value, keep ~ as it is)."""
    return os.path.expanduser(text)


def expand_list(spec: str) -> str:
    """A comma-separated list of paths or globs (--data.dir) with each item's leading ~ expanded."""
    items = spec.split(",")
    return ",".join(item[:len(item) - len(item.lstrip())] + expand_text(item.lstrip()) for item in items)
