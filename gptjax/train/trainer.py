"""The training loop: a run set up as a Plan (gptjax.train.setup), then its steps, each step's report
(the progress display and the metrics logs), the evaluations (gptjax.train.evaluation), the checkpoints
(gptjax.train.saving), a stop on a signal and the end-of-training sample.

Run directory:
  <out_dir>/config.toml          the resolved config of the latest start
  <out_dir>/data/                token shards and meta.json (unless --data.dir says elsewhere)
  <out_dir>/checkpoints/<step>/  orbax checkpoints: params, opt_state, meta
  <out_dir>/metrics.jsonl        one JSON object per logged step and per evaluation
  <out_dir>/tensorboard/         the same figures as TensorBoard events, when tensorboardX is installed
  <out_dir>/wandb/, wandb.json   W&B's files and the W&B run's id, with --train.wandb
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import jax
import numpy as np

from gptjax import data as data_lib
from gptjax.data import align, mix
from gptjax.runtime import disk
from gptjax.config import Config
from gptjax.options import to_toml
from gptjax.errors import UserError
from gptjax.inference.generate import generate_ids
from gptjax.runtime.timing import fmt_time
from gptjax.runtime.signals import StopRequest
from gptjax.train import distributed, evaluation, oom, saving, setup
from gptjax.train.evaluation import bits_per_byte
from gptjax.train.logs import Silent, open_logs
from gptjax.train.optim import learning_rate
from gptjax.train.parallel import describe
from gptjax.train.progress import Progress, Rate


def train(cfg: Config, log=print, stop_after: int | None = None) -> dict:
    """Train as `cfg` says; return the history (losses by step, validation losses by step, …).

    `stop_after` ends the run early at that step with a checkpoint, as an interruption would;
    the schedule still follows train.max_steps, so a resumed run continues exactly.
    """
    distributed.initialize(cfg.dist)  # first: JAX's multi-process runtime starts before any computation
    with distributed.sole_writer(Path(cfg.out_dir), log):
        trainer = None
        try:
            trainer = Trainer(cfg, log)
            with StopRequest() as stop:
                trainer.run(stop, stop_after)
            trainer.close()  # the last checkpoint is written: a failure to write it is this run's failure
        except BaseException as e:
            if trainer is not None:
                trainer.close(quietly=True, failed=True)
            if isinstance(e, Exception) and oom.is_out_of_memory(e):
                raise oom.out_of_memory_error(trainer.plan.cfg if trainer else cfg, e) from None
            raise
    return trainer.finish()


# a real line of the standard library (codecs.py), the end-of-training sample's prompt on the default corpus
STDLIB_PROMPT = "def open(filename, mode='r', encoding=None, errors='strict', buffering=-1):\n"


def final_sample_prompt(cfg: Config) -> str:
    if cfg.train.sample_prompt:
        return cfg.train.sample_prompt.replace("\\n", "\n")
    return STDLIB_PROMPT if not cfg.data.corpus and not cfg.data.dir else ""


def _open_run_files(plan: setup.Plan):
    """config.toml and the metrics logs (metrics.jsonl, TensorBoard, W&B), by process 0 only."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    if not distributed.is_primary():
        return Silent()
    text = to_toml(plan.as_given())
    with disk.writing(plan.run_dir / "config.toml", "the run's config", len(text)):
        (plan.run_dir / "config.toml").write_text(text)
    return open_logs(plan.cfg, plan.run_dir, plan.resume_from, then=saving.AFTER_FAILURE)


def _announce(plan: setup.Plan, log) -> None:
    """The run's header: the model, the compute dtype and why, the steps and the devices."""
    model, t, compute = plan.cfg.model, plan.cfg.train, plan.compute
    log(f"model: {plan.n_params / 1e6:.2f}M parameters, {model.n_layer} layers, {model.n_head} "
        f"heads, width {model.n_embd}, context {model.block_size}, {plan.tok.name} vocabulary "
        f"{model.vocab_size}; {compute.dtype} compute ({compute.why})")
    data, across = plan.mesh_shape
    mesh = f", mesh data {data} x model {across}" if across > 1 else ""
    log(f"train: {t.max_steps} steps of {plan.tokens_per_step:,} tokens on {describe(plan.devices)} "
        f"({t.parallel}{mesh})")


class Trainer:
    """One run in `cfg.out_dir`: the plan its set-up decided, the resources it holds (the checkpointer,
    the logs) and what training changes (the state, the history, the figures since the last report)."""

    def __init__(self, cfg: Config, log=print):
        """Set up a run in `cfg.out_dir`, whose lock the caller holds (train() takes it)."""
        if not distributed.is_primary():
            log = lambda *_: None  # noqa: E731  process 0 speaks for the run
        self.plan, self.ckpt, self.state = setup.set_up(cfg, log)
        t = self.plan.cfg.train
        self.logs = _open_run_files(self.plan)
        _announce(self.plan, log)
        saving.check_room(self.ckpt, t.keep_checkpoints, self.plan.checkpoint_bytes, log)
        self.lr_at = learning_rate(t)
        self.history = {"loss": {}, "val_loss": {}, "val_bpb": {}, "skipped": [], "tasks": {}}
        self.progress = Progress(t.max_steps, log)
        self.last_val = None
        self.window_losses, self.window_tokens, self.window_bytes = [], 0, 0
        self.done = self.plan.start_step
        self.interrupted = ""
        self.t_start = None  # when this start's steps began: the first evaluation of a new run comes before
        self.mix_rows = self._rows_before() if self.plan.mixture is not None else None  # rows each source gave

    def run(self, stop: StopRequest, stop_after: int | None) -> None:
        plan, t = self.plan, self.plan.cfg.train
        if plan.start_step == 0:
            self.evaluate()
        self.t_start = time.time()
        rate, pending = Rate(plan.tokens_per_step), None
        dropout_key = jax.random.key(t.seed + 1)
        for step in range(plan.start_step, t.max_steps):
            if plan.mixture is not None:
                self._count_mixture_rows(step)
            x, y = self._batch(step)
            self.state, metrics = plan.strategy.train_step(self.state, x, y, dropout_key)
            self.window_tokens, self.window_bytes = self.window_tokens + y.size, self.window_bytes + plan.tok.count_bytes(y)
            rate.tick()
            # the previous step's metrics are read only now, so the host never waits on the step in flight
            if pending is not None:
                self.record(*pending, rate)
            self.done, pending = step + 1, (step + 1, plan.strategy.first(metrics))
            evaluating = self.done % t.eval_interval == 0 or self.done == t.max_steps
            stopping = self.done == stop_after or self._stop_agreed(stop)
            checkpointing = self.done % t.ckpt_interval == 0 or self.done == t.max_steps or stopping
            if evaluating or checkpointing:
                self.record(*pending, rate)
                pending = None
            if evaluating:
                self.evaluate()
            if checkpointing:
                saving.save(self.ckpt, plan, self.state, self.done, self.last_val if evaluating else None,
                            self.elapsed, self._mix_meta())
            if stopping:
                self.interrupted = stop.name
                break
        if pending is not None:
            self.record(*pending, rate)
        if stop.signum is not None and not self.interrupted:  # arrived before the first step
            self.interrupted = stop.name

    def _batch(self, step: int):
        """Step `step`'s batch, this process's rows only: of the one stream (its aligned windows with
        --data.align=bos), or drawn from the mixture."""
        plan, t = self.plan, self.plan.cfg.train
        if plan.mixture is not None:
            return plan.mixture.train_batch(plan.cfg.model.block_size, t.seed, step, plan.accum, plan.micro,
                                            plan.strategy.rows(plan.micro))
        if plan.aligned is not None:
            return align.train_batch(plan.aligned, t.seed, step, plan.accum, plan.micro, plan.strategy.rows(plan.micro))
        return data_lib.train_batch(plan.ds, plan.cfg.model.block_size, t.seed, step, plan.accum, plan.micro,
                                    plan.strategy.rows(plan.micro))

    def _rows_before(self) -> np.ndarray:
        """The rows each source gave to the steps before this start: as the checkpoint counted them (the
        weights it trained with, even if the command changed them since), else replayed from (seed, step)."""
        plan, m = self.plan, self.plan.mixture
        saved = self.ckpt.read_meta(plan.start_step).get("mix_rows", {}) if plan.start_step else {}
        if sorted(saved) == sorted(m.names):
            return np.array([saved[n] for n in m.names], dtype=np.int64)
        return mix.rows_drawn(m.sources, m.schedule, plan.cfg.train.seed, plan.accum * plan.micro, plan.start_step)

    def _mix_meta(self) -> dict:
        """What a checkpoint records of the mixture: the rows each source gave so far."""
        if self.plan.mixture is None:
            return {}
        return {"mix_rows": {n: int(r) for n, r in zip(self.plan.mixture.names, self.mix_rows)}}

    def _count_mixture_rows(self, step: int) -> None:
        """Count the rows step `step` draws from each source; with on_exhausted=stop, a source it would read
        past its end stops the run here, with a checkpoint of the steps done, and a UserError."""
        plan, t = self.plan, self.plan.cfg.train
        rows = self.mix_rows + plan.mixture.rows_of_step(t.seed, step, plan.accum * plan.micro)
        try:
            mix.check_exhausted(plan.mixture.sources, plan.mixture.epochs(rows, plan.cfg.model.block_size),
                                plan.mixture.on_exhausted)
        except UserError as e:
            if self.done > plan.start_step and self.ckpt.latest_step() != self.done:
                saving.save(self.ckpt, plan, self.state, self.done, None, self.elapsed, self._mix_meta())
            raise UserError(f"{e} Stopped before step {step + 1}; the checkpoint of step {self.done} is in "
                            f"{self.ckpt.directory}.") from None
        self.mix_rows = rows

    def record(self, done: int, metrics, rate: Rate) -> None:
        """Read a finished step's metrics; log at intervals; stop (or skip) on a non-finite loss."""
        t = self.plan.cfg.train
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not bool(metrics["finite"]):
            if t.on_nonfinite != "skip":
                raise self._not_finite(done, loss, grad_norm)
            self.history["skipped"].append(done)
            self.progress.line(f"warning: step {done} was not finite (loss {loss}, gradient norm {grad_norm}); "
                               "its update was skipped")
            return
        self.history["loss"][done] = loss
        at_interval = done % t.log_interval == 0 or done == t.max_steps
        self.window_losses.append(loss)
        bpb = bits_per_byte(float(np.mean(self.window_losses)), self.window_tokens, self.window_bytes)
        if at_interval:  # report the mean since the last report: one step's loss is noisy
            loss, self.window_losses = float(np.mean(self.window_losses)), []
            self.window_tokens = self.window_bytes = 0
        tokens_per_step = self.plan.tokens_per_step
        tokens_per_s = rate.read(reset=at_interval)
        eta = (t.max_steps - done) * tokens_per_step / max(tokens_per_s, 1e-9)
        lr = float(self.lr_at(done - 1))
        epochs = self._epochs()
        self.progress.step(done, loss, bpb, tokens_per_s, eta, lr, at_interval, epochs)
        if at_interval:
            peak = self.plan.peak
            mfu = tokens_per_s / tokens_per_step * self.plan.flops_per_step / peak if peak else None
            self.logs.write({"step": done, "tokens": done * tokens_per_step, "loss": loss, "bpb": bpb, "lr": lr,
                             "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
                             "elapsed_s": self.elapsed(), **{f"epochs/{n}": e for n, e in epochs.items()}})

    def _epochs(self) -> dict[str, float]:
        """With a mixture: the epochs of each source read so far, by name (logged as epochs/<name>)."""
        m = self.plan.mixture
        if m is None:
            return {}
        return {n: float(e) for n, e in zip(m.names, m.epochs(self.mix_rows, self.plan.cfg.model.block_size))}

    def _not_finite(self, done: int, loss: float, grad_norm: float) -> UserError:
        last = self.ckpt.latest_step()
        where = (f"The last good checkpoint is step {last} in {self.ckpt.directory}; resume from it with "
                 "--train.resume=true and " if last is not None else "No checkpoint was written yet; ")
        return UserError(f"step {done} was not finite (loss {loss}, gradient norm {grad_norm}, or the update "
                         "overflowed), so training stopped before applying more. "
                         f"{where}lower --train.lr, raise --train.warmup_steps, or pass "
                         "--train.on_nonfinite=skip to skip such updates.")

    def evaluate(self) -> None:
        """The validation loss (and the eval tasks' figures) of the step just done, logged and shown."""
        plan, done = self.plan, self.done
        per_source = evaluation.source_validation(plan, self.state) if plan.mixture is not None else {}
        val, bpb = evaluation.mixture_figures(plan, per_source, done) if per_source else \
            evaluation.validation(plan, self.state)
        self.history["val_loss"][done] = self.last_val = val
        self.history["val_bpb"][done] = bpb
        elapsed = self.elapsed()
        figures = evaluation.score_tasks(plan, self.state) if plan.tasks else {}
        if plan.tasks:
            self.history["tasks"][done] = figures
        record, shown = evaluation.report(done, done * plan.tokens_per_step, val, bpb, elapsed, figures, per_source)
        self.logs.write(record)
        self.progress.line(shown)

    def elapsed(self) -> float:
        """Seconds of training so far, over every start of the run (a resumed run goes on counting)."""
        return self.plan.elapsed_before + (time.time() - self.t_start if self.t_start is not None else 0.0)

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether to stop after this step. With several processes, a signal that reached some of them
        is shared at the next log interval, so that all stop (and save) at the same step."""
        t = self.plan.cfg.train
        if jax.process_count() == 1:
            return stop.signum is not None
        if self.done % t.log_interval and self.done != t.max_steps:
            return False
        agreed = distributed.any_process(stop.signum is not None)
        if agreed and stop.signum is None:
            stop.signum = signal.SIGTERM  # another process was asked to stop
        return agreed

    def close(self, quietly: bool = False, failed: bool = False) -> None:
        """Let the last checkpoint finish writing, whatever ended the run; `quietly` after another error,
        which is the one to report (`failed`: the run ended in an error, which W&B records)."""
        try:
            self.ckpt.close()
        except Exception:
            if not quietly:
                raise
        finally:
            self.logs.close(failed)

    def finish(self) -> dict:
        """Say how the run ended, sample from the model if it ran to its end, and return the history."""
        plan, log = self.plan, self.progress.line
        elapsed = fmt_time(time.time() - self.t_start)
        if self.interrupted:
            saved = (f"checkpoint of step {self.done} saved in {self.ckpt.directory}" if self.done > plan.start_step
                     else "no new step to save")
            log(f"stopped by {self.interrupted} after step {self.done} ({elapsed}); {saved}. "
                f"To continue, run the same command with --train.resume=true (--out_dir={plan.run_dir}).")
        else:
            log(f"done: {self.done} steps in {elapsed}; checkpoints in {self.ckpt.directory}")
        if plan.cfg.train.sample_tokens > 0 and not self.interrupted:
            self._sample(log)
        self.history.update(params=plan.n_params, step_compilations=plan.strategy.traces,
                            interrupted=self.interrupted, final_step=self.done)
        return self.history

    def _sample(self, log) -> None:
        """The end-of-training sample: a continuation of the prompt, shown by process 0."""
        plan, t, tok = self.plan, self.plan.cfg.train, self.plan.tok
        params = plan.strategy.host_params(self.state)  # every process takes part; process 0 samples
        if distributed.is_primary():
            prompt = final_sample_prompt(plan.cfg)
            ids = generate_ids(plan.graphdef, params, [[tok.eot_id, *tok.encode(prompt)]],
                               block_size=plan.cfg.model.block_size, eot_id=tok.eot_id,
                               max_new_tokens=t.sample_tokens, temperature=0.8, top_k=200, seed=t.seed)[0]
            log("sample:\n" + prompt + tok.decode(ids))
