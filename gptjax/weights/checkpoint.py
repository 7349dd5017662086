"""Checkpoints with orbax: <run>/checkpoints/<step>/{params, opt_state, meta}.

Parameters and optimizer state are saved as flat dicts keyed by their tree paths
('h/0/attn/c_attn/kernel', …), which any process can read back into its own structure
whatever the device layout that wrote them. `meta` is JSON: step, the full config, the
tokenizer name and the data fingerprint. Orbax writes each step into a temporary folder
and renames it when complete, so a crash mid-save never hides the last good checkpoint.

A step folder, once it has its name, is complete and never changes; it can only disappear,
when the run's retention deletes it. Readers need no lock. A read that fails is told by what is
on disk: "vanished" when the folder is gone, "incomplete" when a piece of it is, "corrupt" only
when a file is there and cannot be decoded, "does not match this model" when the files are intact
but hold other shapes; any other error is the call's own (orbax refusing a relative path, say)
and is raised as it is.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from gptjax import paths

from gptjax.runtime import disk

from gptjax.weights import faults
from gptjax.errors import UserError, drop_unraisable

CHECKPOINTS = "checkpoints"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a checkpoint being written
VANISH_GRACE_S = 2.0  # how long a deletion in progress may take to remove a step folder


class CheckpointVanished(UserError):
    """A checkpoint that was deleted (by a training run's retention, say) while it was being read."""


def path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree) -> dict:
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(template, flat: dict):
    """Put the values of `flat` back into the structure of `template`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_name(p)] for p, _ in paths])


def _abstract(tree, device=None):
    """Where each leaf is read to: a template's own sharding (fsdp: each process reads only its shards),
    else this process's own device (with several processes, jax.devices()[0] may be another host's)."""
    one = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or one),
                        flatten(tree))


def checkpoint_bytes(*trees) -> int:
    """What the arrays of `trees` (arrays or shape/dtype structs) take on disk, uncompressed: a
    checkpoint's size is its parameters' and its optimizer state's."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for t in trees for x in jax.tree.leaves(t))


def list_steps(ckpt_dir: Path) -> list[int]:
    """The complete checkpoints in a checkpoints/ folder, as they are on disk now."""
    try:
        return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())
    except FileNotFoundError:
        return []


def remove_partial(ckpt_dir: Path) -> list[str]:
    """Delete the temporary folders of checkpoints that were never completed (a failed or killed save);
    only a run's one writer may call this, when no save is in flight."""
    removed = []
    for p in ckpt_dir.glob(f"*{TMP_SUFFIX}") if ckpt_dir.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


class _WriteFailureReported(logging.Filter):
    """Orbax logs a failed write with a traceback from each of its threads (six for one full disk);
    Checkpointer reports it once, as a UserError, so those log records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (disk.is_write_failure(error) if error is not None else disk.is_write_failure(
            Exception(record.getMessage())))


_log_filter = _WriteFailureReported()


def _step_error(ckpt_dir: Path, step: int, error: Exception, items: dict) -> Exception:
    """What a failed read of `step` means, from what is on disk: vanished (the folder is gone), incomplete
    (a piece is missing), corrupt (a file is there but cannot be decoded), another model's (intact, other
    shapes), or a disk that failed. Anything else is not known to be about the files: `error` itself is
    returned, with a note naming the checkpoint, for the caller to re-raise with its traceback."""
    path = ckpt_dir / str(step)  # as the user gave it, for the messages
    step_dir = paths.absolute(path)
    steps = list_steps(ckpt_dir)
    if path.exists() and any(s > step for s in steps):
        # a newer checkpoint exists, so retention may be deleting this one right now: let it finish
        deadline = time.monotonic() + VANISH_GRACE_S
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        steps = list_steps(ckpt_dir)
    others = ", ".join(str(s) for s in steps if s != step)
    if not path.exists():
        now = f" Steps there now: {others}." if others else ""
        return CheckpointVanished(f"checkpoint {path} vanished while it was being read: it was deleted, most likely by "
                                  "the retention of a run that is still training there (--train.keep_checkpoints). "
                                  f"Nothing is wrong with the run; read the newest checkpoint instead (no --step, or "
                                  f"gptjax.load without step), which is never deleted.{now}")
    hint = (f" Other checkpoints here: steps {others}; choose one with --step (sample.py, gptjax.load) or move this "
            "one aside to resume from the one before." if others else "")
    found = faults.diagnose(step_dir, error, items)
    if found is None:
        error.add_note(f"gptjax was reading checkpoint {path} when this was raised. The files it needs are there "
                       "and none is known to be damaged: this is most likely a bug in gptjax or in how it calls "
                       "orbax-checkpoint, not a problem of the checkpoint.")
        return error
    kind, what = found
    return UserError({
        "weights_only": f"checkpoint {path} holds parameters but no optimizer state (as the step 0 that python -m "
                        "gptjax convert writes), so a run cannot resume from it. Fine-tune from it instead: "
                        f"--train.init_from={ckpt_dir.parent} with a new --out_dir.",
        "incomplete": f"checkpoint {path} cannot be read: it is incomplete, {what}. A step folder is whole once it "
                      f"has its name, so part of it was deleted or not copied.{hint}",
        "corrupt": f"checkpoint {path} cannot be read: it is corrupt, {what}.{hint}",
        "unreadable": f"checkpoint {path} cannot be read: {what}; check the permissions of its files.",
        "disk": f"checkpoint {path} cannot be read: the disk failed ({what}); its files may well be intact. Check "
                "that disk (`dmesg` may say more), then try again.",
        "mismatch": f"checkpoint {path} does not match this model: its files are intact, but they hold arrays of "
                    f"another model ({what}). Read it into the model it was trained as: its own config "
                    "(gptjax.load), or resume it with the settings it was trained with.",
    }[kind])


def _abandoned_read(report) -> bool:
    """Whether an unraisable error is a leftover of a failed restore, which returns at its first error while
    tensorstore's other reads are still in flight: a read finishing later posts its completion to orbax's
    event loop, closed by then (a RuntimeError raised in tensorstore's thread), or one of orbax's read
    coroutines, never resumed, is closed when it is collected (a GeneratorExit, or the error orbax raises
    from it)."""
    frames = []
    tb = report.exc_traceback
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    if report.exc_type is GeneratorExit or isinstance(getattr(report.exc_value, "__cause__", None), GeneratorExit):
        code = getattr(report.object, "cr_code", None)
        return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    return (report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed" and bool(frames)
            and frames[-1].co_name == "_check_closed" and frames[0].co_name == "call_soon_threadsafe")


def _restore(ckpt_dir: Path, step: int, **items):
    """Read the given items of one step, without scanning (or waiting on) the other steps."""
    ckpt_dir = paths.expand(ckpt_dir)  # relative stays relative, for the messages; orbax gets it absolute
    try:
        reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        return reader.restore(paths.absolute(ckpt_dir) / str(step), args=ocp.args.Composite(**items))
    except Exception as e:  # orbax and tensorstore raise many kinds: _step_error tells them apart by the files
        drop_unraisable(_abandoned_read)  # from this failed read on, each would print a traceback
        reported = _step_error(ckpt_dir, step, e, items)
        if reported is e:
            raise
        raise reported from None


def read_meta(ckpt_dir: Path, step: int) -> dict:
    return _restore(ckpt_dir, step, meta=ocp.args.JsonRestore())["meta"]


def read_state(ckpt_dir: Path, step: int, params_like, opt_state_like=None):
    """Restore into the structures, and the shardings if they have some, of the given templates (arrays or
    shape/dtype structs)."""
    items = {"params": ocp.args.StandardRestore(_abstract(params_like))}
    if opt_state_like is not None:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
    restored = _restore(ckpt_dir, step, **items)
    params = unflatten(params_like, restored["params"])
    opt_state = unflatten(opt_state_like, restored["opt_state"]) if opt_state_like is not None else None
    return params, opt_state


class Checkpointer:
    """A run's checkpoint writer (and, on resume, reader); `then` says what to do after a failed write."""

    def __init__(self, run_dir: str | Path, keep: int = 3, create: bool = True, then: str = "run the same command "
                 "again"):
        """Keep the `keep` latest checkpoints and, beside them, the one with the lowest validation loss."""
        self.directory = paths.absolute(run_dir) / CHECKPOINTS  # orbax takes only absolute paths
        self.then = then
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(n=keep),
            cm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=create)
        with disk.writing(self.directory, "the checkpoint folder", then=then):
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        logging.getLogger("absl").addFilter(_log_filter)
        self.in_flight: tuple[int, int] | None = None  # (step, bytes) of the save being written
        self.failed = False

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Start saving (asynchronously); call wait() before reading it back or exiting.

        A write that fails (a full disk, say) is reported here or by wait(), whichever comes next.
        An empty `opt_state` ({}, as for converted weights) is left out: orbax refuses empty items.
        """
        self.wait()  # the previous save: its failure is reported as its own
        items = {"params": ocp.args.StandardSave(flatten(params)), "meta": ocp.args.JsonSave(meta)}
        if flatten(opt_state):
            items["opt_state"] = ocp.args.StandardSave(flatten(opt_state))
        val_loss = meta.get("val_loss")
        metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
        self.in_flight = (step, checkpoint_bytes(params, opt_state) + len(str(meta)))
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
        except Exception as e:
            self._report_write_failure(e)
            raise

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._report_write_failure(e)
            raise
        self.in_flight = None

    def _report_write_failure(self, error: Exception) -> None:
        """Raise the message of a failed write in place of `error`; any other error is left to its caller to
        re-raise as it is, with its own cause and traceback."""
        failure = self._write_failed(error)
        if failure is not error:
            raise failure from None

    def _write_failed(self, error: Exception) -> Exception:
        """A save that the disk refused: remove its partial folder and say what is left; other errors as they are."""
        if not disk.is_write_failure(error) or self.in_flight is None:
            return error
        step, needed = self.in_flight
        self.in_flight, self.failed = None, True
        if jax.process_index() == 0:
            remove_partial(self.directory)
        intact = list_steps(self.directory)
        if intact:  # what one really takes on this disk: the arrays' bytes, plus a block per small file
            needed = max(needed, disk.used_bytes(self.directory / str(intact[-1])))
        kept = (f"the checkpoint{'s' * (len(intact) > 1)} of step{'s' * (len(intact) > 1)} "
                f"{', '.join(map(str, intact))} {'are' if len(intact) > 1 else 'is'} intact" if intact
                else "no earlier checkpoint was written")
        return disk.write_error(error, self.directory, f"the checkpoint of step {step}", needed,
                                done=f"Its partial folder was removed; {kept}.", then=self.then)

    def read_meta(self, step: int) -> dict:
        return read_meta(self.directory, step)

    def restore(self, step: int, params_like, opt_state_like=None):
        return read_state(self.directory, step, params_like, opt_state_like)

    def close(self) -> None:
        """Let the last save finish; after a reported write failure, only let go of orbax's threads."""
        if not self.failed:
            self.wait()
        try:
            self.manager.close()
        except Exception as e:
            if not (self.failed and disk.is_write_failure(e)):
                raise


def find_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int]:
    """A run directory, its checkpoints/ folder or one step's folder → (run directory, step): the newest
    complete checkpoint unless `step` says which. `path` may be relative or under ~; it stays relative."""
    path = paths.expand(path)
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist. Give a run directory (the --out_dir of train.py).")
    full = Path(os.path.abspath(path))  # names the folders above '6' or '../6' too; no link is resolved
    up = 0
    if full.name.isdigit() and full.parent.name == CHECKPOINTS:
        if step is not None and step != int(full.name):
            raise UserError(f"{path} is the checkpoint of step {full.name}, not of step {step}.")
        step, up = int(full.name), 2
    elif full.name == CHECKPOINTS:
        up = 1
    if up:  # the run directory as the path spells it (out/run of out/run/checkpoints/6), else absolute
        path = path.parents[up - 1] if len(path.parts) > up and ".." not in path.parts else full.parents[up - 1]
    ckpt_dir = path / CHECKPOINTS
    steps = list_steps(ckpt_dir)
    if not steps:
        raise UserError(f"{path} holds no checkpoint (looked in {ckpt_dir}). Train first with "
                        f"`python train.py --out_dir={path}`, or point at another run directory.")
    if step is None or step < 0:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"{path} has no checkpoint of step {step}; it has steps {', '.join(map(str, steps))}.")
    return path, step
