"""A run's checkpoints as the trainer writes them: what each records beside the weights (the config as
given, the tokenizer, the compute dtype and why, the seconds trained, the data it was trained on), and
the warning at the start when the disk cannot hold those that retention keeps."""

from __future__ import annotations

from typing import Callable

from gptjax.runtime import disk
from gptjax.options import to_dict
from gptjax.weights.checkpoint import Checkpointer, list_steps

# what to do once a failed write of the run's files (a full disk) is fixed, as its message says
AFTER_FAILURE = ("run the same command with --train.resume=true: it continues from the newest intact "
                 "checkpoint exactly as if nothing had stopped it")


def save(ckpt: Checkpointer, plan, state, step: int, val_loss: float | None, elapsed: Callable[[], float],
         extra: dict | None = None) -> None:
    """Save the state after `step` of the run of `plan` (a gptjax.train.setup.Plan); `elapsed` gives the
    seconds trained so far, read once the state is on its way; `extra`, more fields of the meta."""
    # the previous save finishes first, before this one's copies are dispatched, so that orbax's thread
    # never reads the last checkpoint's arrays while these slices run (two suite runs aborted inside the
    # slices, with that overlap possible; not reproduced alone)
    ckpt.wait()
    host = plan.strategy.get_state(state)
    meta = {"step": step, "config": to_dict(plan.as_given()), **plan.tok.meta(), "val_loss": val_loss,
            "compute_dtype": plan.compute.dtype, "compute_why": plan.compute_reason,
            "elapsed_s": elapsed(),
            "data": {k: plan.ds.meta.get(k) for k in ("source", "fingerprint")}, **(extra or {})}
    ckpt.save(step, host["params"], host["opt_state"], meta)


def check_room(ckpt: Checkpointer, keep: int, ckpt_bytes: int, log) -> None:
    """Warn now, not hours later, when the disk cannot hold the checkpoints that retention keeps
    plus the one being written (those already there count as held)."""
    held = min(len(list_steps(ckpt.directory)), keep)
    needed = (keep + 1 - held) * ckpt_bytes
    disk.warn_if_short(ckpt.directory, needed, f"{keep + 1} checkpoints of this model (--train.keep_checkpoints="
                       f"{keep}, plus the one being written; {disk.fmt_bytes(ckpt_bytes)} each)", log)
