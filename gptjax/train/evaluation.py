"""The evaluations during training: the validation loss and its bits per byte, on the same batches at
every evaluation, and the figures of the eval tasks (--train.eval_tasks), with the record the metrics
logs take and the line the progress display shows. `plan` is the run's gptjax.train.setup.Plan."""

from __future__ import annotations

import math

import numpy as np

from gptjax import data as data_lib
from gptjax.eval.tasks import score_task
from gptjax.model.score import Scorer

TASK_FIGURES = ("acc", "acc_norm", "perplexity")


def bits_per_byte(loss: float, tokens: int, nbytes: int) -> float:
    """A mean loss in nats per token as bits per UTF-8 byte of the text those tokens cover."""
    return loss * tokens / (max(nbytes, 1) * math.log(2))


def validation(plan, state) -> tuple[float, float]:
    """The mean loss over --train.eval_batches validation batches, and its bits per byte."""
    return _validation(plan, state, plan.ds, plan.val_bytes)


def source_validation(plan, state) -> dict[str, tuple[float, float]]:
    """With a mixture: each source's validation loss and bits per byte on its own validation batches."""
    m = plan.mixture
    return {name: _validation(plan, state, ds, nbytes)
            for name, ds, nbytes in zip(m.names, m.datasets, plan.source_val_bytes)}


def _validation(plan, state, ds, nbytes: int) -> tuple[float, float]:
    """The mean loss over --train.eval_batches validation batches of `ds`, whose targets cover `nbytes`."""
    cfg, t = plan.cfg, plan.cfg.train
    losses = [plan.strategy.eval_loss(state, *data_lib.val_batch(ds, cfg.model.block_size, t.seed, i,
                                                                 plan.micro, plan.strategy.rows(plan.micro)))
              for i in range(t.eval_batches)]
    val = float(np.mean([float(x) for x in losses]))
    return val, bits_per_byte(val, t.eval_batches * plan.micro * cfg.model.block_size, nbytes)


def mixture_figures(plan, per_source: dict, step: int) -> tuple[float, float]:
    """The mixture's validation loss and bits per byte: the sources' own, averaged with the weights in force
    at `step` (what the training batches of that step are drawn in)."""
    weights = plan.mixture.weights(step)
    return (float(sum(w * loss for w, (loss, _) in zip(weights, per_source.values()))),
            float(sum(w * bpb for w, (_, bpb) in zip(weights, per_source.values()))))


def score_tasks(plan, state) -> dict[str, dict[str, float]]:
    """Each eval task's figures (acc, and acc_norm or perplexity) with the parameters of this step."""
    params = plan.strategy.host_params(state)  # every process takes part, and each scores alike
    scorer = Scorer(plan.graphdef, params, plan.cfg.model.block_size, plan.cfg.train.batch_size)
    return {task.name: {k: v for k, v in score_task(scorer, task).items() if k in TASK_FIGURES}
            for task in plan.tasks}


def report(step: int, tokens: int, val: float, bpb: float, elapsed: float,
           figures: dict[str, dict[str, float]], per_source: dict | None = None) -> tuple[dict, str]:
    """An evaluation's record for the metrics logs and its line for the progress display; `per_source`, a
    mixture's (loss, bits per byte) by source, as val_loss/<name> and val_bpb/<name>."""
    record = {"step": step, "tokens": tokens, "val_loss": val, "val_bpb": bpb, "elapsed_s": elapsed}
    shown = f"step {step:>6} | val loss {val:.4f} | val {bpb:.4f} bits/byte"
    for name, (loss, b) in (per_source or {}).items():
        record.update({f"val_loss/{name}": loss, f"val_bpb/{name}": b})
        shown += f" | {name} {b:.4f}"
    for name, values in figures.items():
        record.update({f"{name}/{k}": v for k, v in values.items()})
        shown += f" | {name} " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
    return record, shown
