"""The training loop: data, model, optimizer and strategy wired together, with evaluation,
progress, metrics and checkpoints.

Run directory:
  <out_dir>/config.toml          the resolved config of the latest start
  <out_dir>/data/                token shards and meta.json (unless --data.dir says elsewhere)
  <out_dir>/checkpoints/<step>/  orbax checkpoints: params, opt_state, meta
  <out_dir>/metrics.jsonl        one JSON object per logged step and per evaluation
  <out_dir>/tensorboard/         the same figures as TensorBoard events, when tensorboardX is installed
  <out_dir>/wandb/, wandb.json   W&B's files and the W&B run's id, with --train.wandb
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import data as data_lib
from gptjax.runtime import disk
from gptjax.train import distributed, oom, setup as start, wandb_log
from gptjax.weights.checkpoint import CHECKPOINTS, Checkpointer, checkpoint_bytes, list_steps, remove_partial
from gptjax.config import Config
from gptjax.options import to_dict, to_toml
from gptjax.errors import UserError
from gptjax.model.score import Scorer
from gptjax.eval.tasks import read_tasks, score_task
from gptjax.inference.generate import generate_ids
from gptjax.runtime.timing import fmt_time
from gptjax.train.metrics import MetricsLog, Progress, Rate, flops_per_token, peak_flops
from gptjax.model.gpt import count_params
from gptjax.train.optim import learning_rate, make_optimizer
from gptjax.train.parallel import STRATEGIES, describe, parse_mesh, plan_batch, select_devices
from gptjax.runtime import precision
from gptjax.runtime.signals import StopRequest
from gptjax.model.stacked import relayout
from gptjax.tokenizer import get_tokenizer


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
                raise oom.out_of_memory_error(trainer.cfg if trainer else cfg, e) from None
            raise
    return trainer.finish()


def bits_per_byte(loss: float, tokens: int, nbytes: int) -> float:
    """A mean loss in nats per token as bits per UTF-8 byte of the text those tokens cover."""
    return loss * tokens / (max(nbytes, 1) * math.log(2))


# a real line of the standard library (codecs.py), the end-of-training sample's prompt on the default corpus
STDLIB_PROMPT = "def open(filename, mode='r', encoding=None, errors='strict', buffering=-1):\n"


def final_sample_prompt(cfg: Config) -> str:
    if cfg.train.sample_prompt:
        return cfg.train.sample_prompt.replace("\\n", "\n")
    return STDLIB_PROMPT if not cfg.data.corpus and not cfg.data.dir else ""


def _read_tasks(spec: str, tok, block_size: int, log) -> list:
    tasks = read_tasks(spec, tok, block_size) if spec else []
    for task in tasks:
        log(f"eval task {task.name}: {len(task.examples):,} {task.kind.replace('_', ' ')} examples from {task.path}")
        if task.warning():
            log(task.warning())
    return tasks


AFTER_FAILURE = ("run the same command with --train.resume=true: it continues from the newest intact "
                 "checkpoint exactly as if nothing had stopped it")


class Trainer:
    """One run in `cfg.out_dir`, set up by the steps of __init__ in their order: each decides one thing
    and checks what it can before the next, more costly one (inputs before data, data before the model)."""

    def __init__(self, cfg: Config, log=print):
        """Set up a run in `cfg.out_dir`, whose lock the caller holds (train() takes it)."""
        if not distributed.is_primary():
            log = lambda *_: None  # noqa: E731  process 0 speaks for the run
        self.log, self.run_dir = log, Path(cfg.out_dir)
        self.ckpt = self.metrics_log = None
        cfg, given_vocab, source = self._settle_config(cfg)
        self._read_tasks_early(cfg, source)
        latest, saved = self._find_resume_point(cfg)
        self.given_dtype = cfg.model.dtype
        cfg, self.compute, self.compute_reason = self._settle_dtype(cfg, saved)
        self._plan_devices(cfg.train)
        cfg = self._load_data(cfg, given_vocab, source, latest, saved)
        self.cfg, self.t = cfg, cfg.train
        self.ckpt = self.ckpt or Checkpointer(self.run_dir, keep=self.t.keep_checkpoints, then=AFTER_FAILURE)
        shapes = self._build_state(cfg, latest, saved, source)
        self._open_run_files(cfg, resuming=latest is not None)
        self._announce(cfg, shapes)
        self.history = {"loss": {}, "val_loss": {}, "val_bpb": {}, "skipped": [], "tasks": {}}
        self.progress = Progress(self.t.max_steps, log)
        self.last_val = None
        self.window_losses, self.window_tokens, self.window_bytes = [], 0, 0
        self.done = self.start
        self.interrupted = ""

    def _settle_config(self, cfg: Config):
        """The run's config with the vocabulary size filled in, and for a fine-tune its source's model and
        tokenizer. Returns (cfg, the vocabulary size as given, the fine-tune's source or None)."""
        given_vocab = cfg.model.vocab_size
        cfg = start.resolve(cfg)
        if cfg.train.wandb:
            wandb_log.check_installed(cfg.train.wandb)
        source = None
        if cfg.train.init_from:
            cfg, source = start.adopt_source_model(cfg)
            given_vocab = cfg.model.vocab_size
        return cfg, given_vocab, source

    def _read_tasks_early(self, cfg: Config, source) -> None:
        """Task files are read before any data is prepared, so that their mistakes cost nothing; a
        tokenizer learned from the corpus is known only once the data is, and its tasks are read then."""
        self.known_tok = source.tokenizer if source else (
            None if cfg.data.tokenizer == "bpe" else get_tokenizer(cfg.data.tokenizer))
        self.tasks = _read_tasks(cfg.train.eval_tasks, self.known_tok, cfg.model.block_size, self.log) \
            if self.known_tok else []

    def _find_resume_point(self, cfg: Config):
        """The newest intact checkpoint to continue from, or None for a new run; refuses to write over a
        run that was not asked to resume, and a checkpoint of another model. Returns (step, its meta)."""
        t, run_dir = cfg.train, self.run_dir
        # open (and so create) the checkpoint folder only once the inputs have been checked
        existing = (run_dir / CHECKPOINTS).is_dir()
        if existing and distributed.is_primary():
            remove_partial(run_dir / CHECKPOINTS)  # left by a save that was killed or refused by a full disk
        if existing:
            self.ckpt = Checkpointer(run_dir, keep=t.keep_checkpoints, create=False, then=AFTER_FAILURE)
        latest = self.ckpt.latest_step() if self.ckpt else None
        if latest is not None and not t.resume:
            raise UserError(f"{run_dir} already holds checkpoints (latest: step {latest}). Pass --train.resume=true "
                            "to continue that run, or choose another --out_dir; nothing was changed.")
        if t.resume and latest is None:
            self.log(f"resume: no checkpoint in {run_dir} yet; starting from scratch")
        self.elapsed_before, saved = 0.0, None
        if latest is not None:
            saved = self.ckpt.read_meta(latest)
            start.check_resumable(saved, cfg, run_dir)
            self.elapsed_before = float(saved.get("elapsed_s", 0.0))
        return latest, saved

    def _settle_dtype(self, cfg: Config, saved: dict | None):
        """The compute dtype the model is built in, decided before anything is traced (auto's measurement runs
        real products): as set, or what auto stands for here (the same on every process of the run), or for a
        resumed auto run the one it started with, so that a resume computes what the run computed. The config
        written to the run keeps the dtype as given. Returns (cfg with the concrete dtype, the decision for the
        header, the reason checkpoints record)."""
        if cfg.model.dtype != "auto":
            decision = precision.explain(cfg.model.dtype)
            return cfg, decision, decision.why
        if saved is not None and saved.get("compute_dtype") in ("float32", "bfloat16"):
            reason = saved.get("compute_why", "not recorded")
            decision = precision.Decision(saved["compute_dtype"], f"auto: as this run decided at its start, {reason}; "
                                          "--model.dtype= changes it")
        else:
            if jax.process_count() > 1:  # every process computes alike: bfloat16 only where all chose it
                precision.agree(not distributed.any_process(precision.decide().dtype != "bfloat16"))
            reason = precision.decide().why
            decision = precision.explain("auto")
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=decision.dtype)), decision, reason

    def _as_given(self, cfg: Config) -> Config:
        """The config as the run is recorded: its dtype as given (auto stays auto, for readers elsewhere)."""
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=self.given_dtype))

    def _plan_devices(self, t) -> None:
        """The devices, and the batch cut into micro-batches that split evenly over them."""
        self.devices = select_devices(t.devices)
        self.mesh_shape = parse_mesh(t.mesh, len(self.devices), jax.process_count())  # (data, model)
        self.accum, self.micro = plan_batch(t.batch_size, t.grad_accum, self.mesh_shape[0], jax.process_count())
        if (self.accum, self.micro) != (t.grad_accum, t.batch_size):
            self.log(f"batch: {t.grad_accum} x {t.batch_size} sequences re-cut as {self.accum} x {self.micro}, "
                     f"which splits evenly over {describe(self.devices)}")

    def _load_data(self, cfg: Config, given_vocab, source, latest, saved) -> Config:
        """The token shards (prepared by process 0 first, if they are not ready) and their tokenizer;
        the config with the vocabulary a learned tokenizer has, checked against the checkpoint's."""
        self.ds = distributed.process_0_first(lambda: data_lib.load(
            cfg.data, self.run_dir / "data", log=self.log, tokenizer=source.tokenizer if source else None))
        data_lib.check_fits(self.ds, cfg.model.block_size)
        self.tok = self.ds.tokenizer
        if self.known_tok is None:
            self.tasks = _read_tasks(cfg.train.eval_tasks, self.tok, cfg.model.block_size, self.log)
        cfg = start.resolve(cfg, self.tok, given_vocab)  # the size a learned tokenizer has
        if latest is not None and self.tok.ranks_text:
            start.check_same_tokenizer(saved, self.tok, self.run_dir)
            start.check_resumable(saved, cfg, self.run_dir)
        return cfg

    def _build_state(self, cfg: Config, latest, saved, source) -> dict:
        """The strategy, and the training state created, restored or taken from the fine-tune's source
        straight into its layout: with fsdp no process holds the whole state. Returns its shapes."""
        t = cfg.train
        self.graphdef, make_params = start.model_init(cfg)
        tx = make_optimizer(t)

        def make_state():
            params = make_params()
            return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

        shapes = jax.eval_shape(make_state)
        self.strategy = STRATEGIES[t.parallel](self.graphdef, tx, cfg.model.dropout, self.devices,
                                               t.on_nonfinite == "skip", loss_chunk=t.loss_chunk, remat=t.remat,
                                               mesh=t.mesh)
        self.start = 0
        if latest is not None:
            restored = start.restore_state(self.ckpt, latest, saved, shapes, self.strategy, cfg.model.scan_layers)
            self.state = self.strategy.put_state(restored)
            self.start = latest
            self.log(f"resume: continuing from step {latest} of {self.run_dir}")
        elif source is not None:  # read whole, as sampling reads it
            params = relayout(source.params, cfg.model.scan_layers)
            self.state = self.strategy.put_state({"params": params, "opt_state": jax.jit(tx.init)(params),
                                                  "step": jnp.int32(0)})
            self.log(f"init: weights from {t.init_from}")
        else:
            self.state = self.strategy.init_state(make_state)
        return shapes

    def _open_run_files(self, cfg: Config, resuming: bool) -> None:
        """config.toml and the metrics logs (metrics.jsonl, TensorBoard, W&B), by process 0 only."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not distributed.is_primary():
            self.metrics_log = distributed.Silent()
            return
        text = to_toml(self._as_given(cfg))
        with disk.writing(self.run_dir / "config.toml", "the run's config", len(text)):
            (self.run_dir / "config.toml").write_text(text)
        others = [wandb_log.WandbLog(cfg, self.run_dir, resuming)] if cfg.train.wandb else []
        self.metrics_log = MetricsLog(self.run_dir, self.start if resuming else None, others, then=AFTER_FAILURE)

    def _announce(self, cfg: Config, shapes: dict) -> None:
        """The run's header (model, compute dtype and why, steps and devices), the FLOPs that MFU is
        measured by, the disk room for the checkpoints, and the bytes of the validation text."""
        t = cfg.train
        self.n_params = count_params(shapes["params"])
        self.tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
        peak = peak_flops(self.devices[0])
        self.flops_per_step = flops_per_token(cfg.model, self.n_params) * self.tokens_per_step
        self.peak = peak * len(self.devices) if peak else None
        compute = self.compute
        self.log(f"model: {self.n_params / 1e6:.2f}M parameters, {cfg.model.n_layer} layers, {cfg.model.n_head} "
                 f"heads, width {cfg.model.n_embd}, context {cfg.model.block_size}, {self.tok.name} vocabulary "
                 f"{cfg.model.vocab_size}; {compute.dtype} compute ({compute.why})")
        data, model = self.mesh_shape
        mesh = f", mesh data {data} x model {model}" if model > 1 else ""
        self.log(f"train: {t.max_steps} steps of {self.tokens_per_step:,} tokens on {describe(self.devices)} "
                 f"({t.parallel}{mesh})")
        self._check_room(checkpoint_bytes(shapes["params"], shapes["opt_state"]))
        # the validation batches are the same at every evaluation: the bytes their targets cover, once
        self.val_bytes = sum(self.tok.count_bytes(data_lib.val_batch(self.ds, cfg.model.block_size, t.seed, i,
                                                                     self.micro)[1]) for i in range(t.eval_batches))

    def _check_room(self, ckpt_bytes: int) -> None:
        """Warn now, not hours later, when the disk cannot hold the checkpoints that retention keeps
        plus the one being written (those already there count as held)."""
        keep = self.t.keep_checkpoints
        held = min(len(list_steps(self.ckpt.directory)), keep)
        needed = (keep + 1 - held) * ckpt_bytes
        disk.warn_if_short(self.ckpt.directory, needed, f"{keep + 1} checkpoints of this model (--train.keep_checkpoints="
                           f"{keep}, plus the one being written; {disk.fmt_bytes(ckpt_bytes)} each)", self.log)

    def evaluate(self) -> float:
        cfg, t = self.cfg, self.t
        losses = [self.strategy.eval_loss(self.state, *data_lib.val_batch(self.ds, cfg.model.block_size, t.seed, i,
                                                                          self.micro, self.strategy.rows(self.micro)))
                  for i in range(t.eval_batches)]
        val = float(np.mean([float(x) for x in losses]))
        bpb = bits_per_byte(val, t.eval_batches * self.micro * cfg.model.block_size, self.val_bytes)
        self.history["val_loss"][self.done] = self.last_val = val
        self.history["val_bpb"][self.done] = bpb
        record = {"step": self.done, "tokens": self.done * self.tokens_per_step, "val_loss": val, "val_bpb": bpb,
                  "elapsed_s": self.elapsed()}
        shown = f"step {self.done:>6} | val loss {val:.4f} | val {bpb:.4f} bits/byte"
        if self.tasks:
            figures = self.score_tasks()
            self.history["tasks"][self.done] = figures
            for name, values in figures.items():
                record.update({f"{name}/{k}": v for k, v in values.items()})
                shown += f" | {name} " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.metrics_log.write(record)
        self.progress.line(shown)
        return val

    def elapsed(self) -> float:
        """Seconds of training so far, over every start of the run (a resumed run goes on counting)."""
        return self.elapsed_before + (time.time() - self.t_start if hasattr(self, "t_start") else 0.0)

    def score_tasks(self) -> dict[str, dict[str, float]]:
        """Each eval task's figures (acc, and acc_norm or perplexity) with the parameters of this step."""
        params = self.strategy.host_params(self.state)  # every process takes part, and each scores alike
        scorer = Scorer(self.graphdef, params, self.cfg.model.block_size, self.t.batch_size)
        return {task.name: {k: v for k, v in score_task(scorer, task).items() if k in ("acc", "acc_norm", "perplexity")}
                for task in self.tasks}

    def save(self, val_loss: float | None) -> None:
        # the previous save finishes first, before this one's copies are dispatched, so that orbax's thread
        # never reads the last checkpoint's arrays while these slices run (two suite runs aborted inside the
        # slices, with that overlap possible; not reproduced alone)
        self.ckpt.wait()
        host = self.strategy.get_state(self.state)
        meta = {"step": self.done, "config": to_dict(self._as_given(self.cfg)), **self.tok.meta(), "val_loss": val_loss,
                "compute_dtype": self.compute.dtype, "compute_why": self.compute_reason,
                "elapsed_s": self.elapsed(),
                "data": {k: self.ds.meta.get(k) for k in ("source", "fingerprint")}}
        self.ckpt.save(self.done, host["params"], host["opt_state"], meta)

    def record(self, done: int, metrics, rate: Rate) -> None:
        """Read a finished step's metrics; log at intervals; stop (or skip) on a non-finite loss."""
        t = self.t
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not bool(metrics["finite"]):
            if t.on_nonfinite == "skip":
                self.history["skipped"].append(done)
                self.progress.line(f"warning: step {done} was not finite (loss {loss}, gradient norm {grad_norm}); "
                                   "its update was skipped")
                return
            last = self.ckpt.latest_step()
            where = (f"The last good checkpoint is step {last} in {self.ckpt.directory}; resume from it with "
                     "--train.resume=true and " if last is not None else "No checkpoint was written yet; ")
            raise UserError(f"step {done} was not finite (loss {loss}, gradient norm {grad_norm}, or the update "
                            "overflowed), so training stopped before applying more. "
                            f"{where}lower --train.lr, raise --train.warmup_steps, or pass "
                            "--train.on_nonfinite=skip to skip such updates.")
        self.history["loss"][done] = loss
        at_interval = done % t.log_interval == 0 or done == t.max_steps
        self.window_losses.append(loss)
        bpb = bits_per_byte(float(np.mean(self.window_losses)), self.window_tokens, self.window_bytes)
        if at_interval:  # report the mean since the last report: one step's loss is noisy
            loss, self.window_losses = float(np.mean(self.window_losses)), []
            self.window_tokens = self.window_bytes = 0
        tokens_per_s = rate.read(reset=at_interval)
        eta = (t.max_steps - done) * self.tokens_per_step / max(tokens_per_s, 1e-9)
        lr = float(self.lr_at(done - 1))
        self.progress.step(done, loss, bpb, tokens_per_s, eta, lr, at_interval)
        if at_interval:
            mfu = tokens_per_s / self.tokens_per_step * self.flops_per_step / self.peak if self.peak else None
            self.metrics_log.write({"step": done, "tokens": done * self.tokens_per_step, "loss": loss, "bpb": bpb,
                                    "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
                                    "elapsed_s": self.elapsed()})

    def run(self, stop: StopRequest, stop_after: int | None) -> None:
        cfg, t = self.cfg, self.t
        self.lr_at = learning_rate(t)
        if self.start == 0:
            self.evaluate()
        self.t_start = time.time()
        rate, pending = Rate(self.tokens_per_step), None
        dropout_key = jax.random.key(t.seed + 1)
        for step in range(self.start, t.max_steps):
            x, y = data_lib.train_batch(self.ds, cfg.model.block_size, t.seed, step, self.accum, self.micro,
                                        self.strategy.rows(self.micro))  # this process's rows only
            self.state, metrics = self.strategy.train_step(self.state, x, y, dropout_key)
            self.window_tokens, self.window_bytes = self.window_tokens + y.size, self.window_bytes + self.tok.count_bytes(y)
            rate.tick()
            # the previous step's metrics are read only now, so the host never waits on the step in flight
            if pending is not None:
                self.record(*pending, rate)
            self.done, pending = step + 1, (step + 1, self.strategy.first(metrics))
            evaluating = self.done % t.eval_interval == 0 or self.done == t.max_steps
            stopping = self.done == stop_after or self._stop_agreed(stop)
            checkpointing = self.done % t.ckpt_interval == 0 or self.done == t.max_steps or stopping
            if evaluating or checkpointing:
                self.record(*pending, rate)
                pending = None
            if evaluating:
                self.evaluate()
            if checkpointing:
                self.save(self.last_val if evaluating else None)
            if stopping:
                self.interrupted = stop.name
                break
        if pending is not None:
            self.record(*pending, rate)
        if stop.signum is not None and not self.interrupted:  # arrived before the first step
            self.interrupted = stop.name

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether to stop after this step. With several processes, a signal that reached some of them
        is shared at the next log interval, so that all stop (and save) at the same step."""
        if jax.process_count() == 1:
            return stop.signum is not None
        if self.done % self.t.log_interval and self.done != self.t.max_steps:
            return False
        agreed = distributed.any_process(stop.signum is not None)
        if agreed and stop.signum is None:
            stop.signum = signal.SIGTERM  # another process was asked to stop
        return agreed

    def close(self, quietly: bool = False, failed: bool = False) -> None:
        """Let the last checkpoint finish writing, whatever ended the run; `quietly` after another error,
        which is the one to report (`failed`: the run ended in an error, which W&B records)."""
        try:
            if self.ckpt is not None:
                self.ckpt.close()
        except Exception:
            if not quietly:
                raise
        finally:
            if self.metrics_log is not None:
                self.metrics_log.close(failed)

    def finish(self) -> dict:
        t, log = self.t, self.progress.line
        elapsed = fmt_time(time.time() - self.t_start)
        if self.interrupted:
            saved = (f"checkpoint of step {self.done} saved in {self.ckpt.directory}" if self.done > self.start
                     else "no new step to save")
            log(f"stopped by {self.interrupted} after step {self.done} ({elapsed}); {saved}. "
                f"To continue, run the same command with --train.resume=true (--out_dir={self.run_dir}).")
        else:
            log(f"done: {self.done} steps in {elapsed}; checkpoints in {self.ckpt.directory}")
        if t.sample_tokens > 0 and not self.interrupted:
            tok = self.tok
            params = self.strategy.host_params(self.state)  # every process takes part; process 0 samples
            if distributed.is_primary():
                prompt = final_sample_prompt(self.cfg)
                ids = generate_ids(self.graphdef, params, [[tok.eot_id, *tok.encode(prompt)]],
                                   block_size=self.cfg.model.block_size, eot_id=tok.eot_id,
                                   max_new_tokens=t.sample_tokens, temperature=0.8, top_k=200, seed=t.seed)[0]
                log("sample:\n" + prompt + tok.decode(ids))
        self.history.update(params=self.n_params, step_compilations=self.strategy.traces,
                            interrupted=self.interrupted, final_step=self.done)
        return self.history
