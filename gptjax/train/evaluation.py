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
    cfg, t = plan.cfg, plan.cfg.train
    losses = [plan.strategy.eval_loss(state, *data_lib.val_batch(plan.ds, cfg.model.block_size, t.seed, i,
                                                                 plan.micro, plan.strategy.rows(plan.micro)))
              for i in range(t.eval_batches)]
    val = float(np.mean([float(x) for x in losses]))
    return val, bits_per_byte(val, t.eval_batches * plan.micro * cfg.model.block_size, plan.val_bytes)


def score_tasks(plan, state) -> dict[str, dict[str, float]]:
    """Each eval task's figures (acc, and acc_norm or perplexity) with the parameters of this step."""
    params = plan.strategy.host_params(state)  # every process takes part, and each scores alike
    scorer = Scorer(plan.graphdef, params, plan.cfg.model.block_size, plan.cfg.train.batch_size)
    return {task.name: {k: v for k, v in score_task(scorer, task).items() if k in TASK_FIGURES}
            for task in plan.tasks}


def report(step: int, tokens: int, val: float, bpb: float, elapsed: float,
           figures: dict[str, dict[str, float]]) -> tuple[dict, str]:
    """An evaluation's record for the metrics logs and its line for the progress display."""
    record = {"step": step, "tokens": tokens, "val_loss": val, "val_bpb": bpb, "elapsed_s": elapsed}
    shown = f"step {step:>6} | val loss {val:.4f} | val {bpb:.4f} bits/byte"
    for name, values in figures.items():
        record.update({f"{name}/{k}": v for k, v in values.items()})
        shown += f" | {name} " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
    return record, shown
