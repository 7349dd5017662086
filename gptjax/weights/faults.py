"""Why a read of one checkpoint step failed, told from what is on disk rather than from the exception's type.

Orbax and tensorstore raise a ValueError for a request they refuse (a relative path) and for a file they
cannot decode alike, and an AttributeError for a JSON file that parses but is not what orbax wrote. So a
failed read is explained by evidence: a piece of the step that is missing, a JSON file that does not
parse, tensorstore naming a file of the step with a status that means damage, the disk's own error, or
arrays stored in other shapes than those asked for. Without such evidence the error is not the files'.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import orbax.checkpoint as ocp

from gptjax.runtime import disk

# tensorstore's status codes (each of its messages starts with one) that say what is wrong with a file it
# read; a zstd chunk that does not decompress is FAILED_PRECONDITION
_FILE_STATUS = {"DATA_LOSS": "corrupt", "OUT_OF_RANGE": "corrupt", "FAILED_PRECONDITION": "corrupt",
                "NOT_FOUND": "incomplete", "PERMISSION_DENIED": "unreadable"}
JSON_FILE = "metadata"  # a JSON item's file (orbax's JsonCheckpointHandler)
TREE_METADATA = "_METADATA"  # a tree item's structure, JSON (orbax's PyTree handler); a read does without it


def chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from or while handling."""
    seen: list[BaseException] = []
    while error is not None and all(error is not e for e in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def first_line(error: BaseException) -> str:
    text = str(error).split(" [tensorstore_spec")[0]  # tensorstore appends its whole spec to every message
    return (text.strip().splitlines() or [type(error).__name__])[0][:300]


def _missing(step_dir: Path, items: dict) -> str | None:
    """The first piece of the items being read that is not in the step folder, or None."""
    for name, arg in items.items():
        if not (step_dir / name).is_dir():
            return f"{name}/"
        if isinstance(arg, ocp.args.JsonRestore) and not (step_dir / name / JSON_FILE).is_file():
            return f"{name}/{JSON_FILE}"
    return None


def _undecodable(step_dir: Path, items: dict) -> str | None:
    """The first JSON file of the items being read that does not parse, with the parser's reason, or None."""
    for name, arg in items.items():
        file = step_dir / name / (JSON_FILE if isinstance(arg, ocp.args.JsonRestore) else TREE_METADATA)
        try:
            json.loads(file.read_bytes())
        except FileNotFoundError:  # only a tree's _METADATA, which orbax can do without
            continue
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return f"{name}/{file.name} is not JSON ({e})"
    return None


def _file_status(step_dir: Path, error: BaseException) -> tuple[str, str] | None:
    """(kind, the library's message) when tensorstore or the system says that a file of the step folder is
    damaged, missing or not readable; None when the error names no file there."""
    for e in chain(error):
        text = first_line(e)
        if isinstance(e, PermissionError):
            return "unreadable", text
        kind = _FILE_STATUS.get(text.split(":", 1)[0])
        if kind and f"{step_dir}{os.sep}" in str(e):
            return kind, text
    return None


def _shape_difference(step_dir: Path, items: dict) -> str | None:
    """How the arrays stored for the items differ (names, shapes) from those they are read into, or None
    when they agree or their metadata cannot be read (the read's own error then stands)."""
    for name, arg in items.items():
        if not isinstance(arg, ocp.args.StandardRestore):
            continue
        try:
            stored = {k: tuple(v.shape) for k, v in ocp.StandardCheckpointHandler().metadata(step_dir / name).items()}
        except Exception:  # noqa: BLE001  a diagnosis only: whatever it meets, the read's own error is reported
            continue
        wanted = {k: tuple(v.shape) for k, v in arg.item.items()}
        diffs = [f"{k}: stored {stored[k]}, this model {wanted[k]}" for k in stored
                 if k in wanted and stored[k] != wanted[k]]
        diffs += [f"{k} is stored but not in this model" for k in stored if k not in wanted]
        diffs += [f"{k} is in this model but not stored" for k in wanted if k not in stored]
        if diffs:
            more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            return f"{name}: {'; '.join(diffs[:3])}{more}"
    return None


def diagnose(step_dir: Path, error: BaseException, items: dict) -> tuple[str, str] | None:
    """(kind, what was found) for a failed read of the `items` (name: orbax restore args) of the step folder
    `step_dir` (absolute, and there), or None when nothing on disk explains `error`. The kinds:
    weights_only (no optimizer state beside the parameters), incomplete, corrupt, unreadable (permissions),
    disk (the storage failed) and mismatch (intact arrays of other shapes)."""
    missing = _missing(step_dir, items)
    if missing == "opt_state/" and (step_dir / "params").is_dir():
        return "weights_only", missing
    if missing:
        there = ", ".join(sorted(p.name for p in step_dir.iterdir())) or "nothing"
        return "incomplete", f"{missing} is missing (the step folder holds {there})"
    undecodable = _undecodable(step_dir, items)
    if undecodable:
        return "corrupt", undecodable
    status = _file_status(step_dir, error)
    if status:
        kind, text = status
        return kind, {"corrupt": "a file of it cannot be decoded", "incomplete": "a file of it is missing",
                      "unreadable": "a file of it cannot be opened"}[kind] + f" ({text})"
    failure = disk.storage_failure(error)
    if failure:
        return "disk", failure
    difference = _shape_difference(step_dir, items)
    if difference:
        return "mismatch", difference
    return None
