"""The training loop: data, model, optimizer and strategy wired together, with evaluation,
progress, metrics and checkpoints.

Run directory:
  <out_dir>/config.toml          the resolved config of the latest start
  <out_dir>/data/                token shards and meta.json (unless --data.dir says elsewhere)
  <out_dir>/checkpoints/<step>/  orbax checkpoints: params, opt_state, meta
  <out_dir>/metrics.jsonl        one JSON object per logged step and per evaluation
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import data as data_lib
from gptjax.checkpoint import CHECKPOINTS, Checkpointer
from gptjax.config import Config, from_dict, to_dict, to_toml
from gptjax.errors import UserError
from gptjax.generate import generate_ids
from gptjax.model import GPT, count_params
from gptjax.optim import learning_rate, make_optimizer
from gptjax.parallel import Pmap, check_divisible, select_devices
from gptjax.tokenizer import get_tokenizer


def resolve(cfg: Config) -> Config:
    """Fill in what depends on the tokenizer (the vocabulary size)."""
    tok = get_tokenizer(cfg.data.tokenizer)
    vocab = cfg.model.vocab_size or tok.vocab_size
    if vocab < tok.vocab_size:
        raise UserError(f"--model.vocab_size={vocab} is smaller than the {tok.name} tokenizer's {tok.vocab_size}; "
                        "use 0 to take the tokenizer's.")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def init_model(cfg: Config):
    model = GPT(cfg.model, nnx.Rngs(params=jax.random.key(cfg.train.seed)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)  # plain nested dicts: clean names in checkpoints


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """Appends JSON lines; on resume, drops lines past the checkpoint so steps are not repeated."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _check_resumable(saved: dict, cfg: Config, run_dir: Path) -> None:
    saved_cfg = from_dict(Config, saved["config"], where=" in the checkpoint's config")
    if saved_cfg.model != cfg.model or saved_cfg.data.tokenizer != cfg.data.tokenizer:
        diffs = [f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in {
            **{f"model.{k}": (v, getattr(cfg.model, k)) for k, v in to_dict(saved_cfg.model).items()},
            "data.tokenizer": (saved_cfg.data.tokenizer, cfg.data.tokenizer),
        }.items() if a != b]
        raise UserError(f"cannot resume {run_dir}: its checkpoint was trained with another model or tokenizer "
                        f"({'; '.join(diffs)}). Resume with the same settings, or start a new --out_dir.")


def _adopt_source_model(cfg: Config):
    """For --train.init_from: the source's model shape (keeping this run's dropout and dtype) and its weights."""
    from gptjax.convert import load_params  # the Hugging Face reader is needed only here

    src, params = load_params(cfg.train.init_from)
    if src.data.tokenizer != cfg.data.tokenizer:
        raise UserError(f"--train.init_from={cfg.train.init_from} was trained with the {src.data.tokenizer} tokenizer, "
                        f"but this run uses {cfg.data.tokenizer}; pass --data.tokenizer={src.data.tokenizer}.")
    model = dataclasses.replace(src.model, dropout=cfg.model.dropout, dtype=cfg.model.dtype)
    return dataclasses.replace(cfg, model=model), params


def train(cfg: Config, log=print, stop_after: int | None = None) -> dict:
    """Train as `cfg` says; return the history (losses by step, validation losses by step).

    `stop_after` ends the run early at that step with a checkpoint, as an interruption would;
    the schedule still follows train.max_steps, so a resumed run continues exactly.
    """
    cfg = resolve(cfg)
    init_params = None
    if cfg.train.init_from:
        cfg, init_params = _adopt_source_model(cfg)
    t = cfg.train
    run_dir = Path(cfg.out_dir)
    tok = get_tokenizer(cfg.data.tokenizer)

    # open (and so create) the checkpoint folder only once the inputs have been checked
    existing = (run_dir / CHECKPOINTS).is_dir()
    ckpt = Checkpointer(run_dir, keep=t.keep_checkpoints, create=False) if existing else None
    latest = ckpt.latest_step() if ckpt else None
    if latest is not None and not t.resume:
        raise UserError(f"{run_dir} already holds checkpoints (latest: step {latest}). Pass --train.resume=true "
                        "to continue that run, or choose another --out_dir; nothing was changed.")
    if t.resume and latest is None:
        log(f"resume: no checkpoint in {run_dir} yet; starting from scratch")
    if latest is not None:
        _check_resumable(ckpt.read_meta(latest), cfg, run_dir)

    devices = select_devices(t.devices)
    check_divisible(t.batch_size, len(devices))

    ds = data_lib.prepare(cfg.data, Path(cfg.data.dir) if cfg.data.dir else run_dir / "data", log=log)
    data_lib.check_fits(ds, cfg.model.block_size)
    if ckpt is None:
        ckpt = Checkpointer(run_dir, keep=t.keep_checkpoints)

    graphdef, params = init_model(cfg)
    if init_params is not None and latest is None:
        params = init_params
        log(f"init: weights from {t.init_from}")
    tx = make_optimizer(t)
    opt_state = tx.init(params)
    start = 0
    if latest is not None:
        params, opt_state = ckpt.restore(latest, params, opt_state)
        start = latest
        log(f"resume: continuing from step {start} of {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", start if latest is not None else None)

    n_params = count_params(params)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
    log(f"model: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layer} layers, {cfg.model.n_head} heads, "
        f"width {cfg.model.n_embd}, context {cfg.model.block_size}, {tok.name} vocabulary {cfg.model.vocab_size}")
    log(f"train: {t.max_steps} steps of {tokens_per_step:,} tokens on {len(devices)} "
        f"{devices[0].platform} device(s) ({t.parallel})")

    strategy = Pmap(graphdef, tx, cfg.model.dropout, devices)
    state = strategy.put_state({"params": params, "opt_state": opt_state, "step": jnp.int32(start)})
    dropout_key = jax.random.key(t.seed + 1)

    def evaluate(state) -> float:
        losses = [strategy.eval_loss(state, *data_lib.val_batch(ds, cfg.model.block_size, t.seed, i, t.batch_size))
                  for i in range(t.eval_batches)]
        return float(np.mean([float(x) for x in losses]))

    def meta(step: int, val_loss: float | None) -> dict:
        return {"step": step, "config": to_dict(cfg), "tokenizer": tok.name, "val_loss": val_loss,
                "data": {"source": ds.meta["source"], "fingerprint": ds.meta["fingerprint"]}}

    def save(state, step: int, val_loss: float | None) -> None:
        host = strategy.get_state(state)
        ckpt.save(step, host["params"], host["opt_state"], meta(step, val_loss))

    history = {"loss": {}, "val_loss": {}}
    if start == 0:
        val = evaluate(state)
        history["val_loss"][0] = val
        metrics_log.write({"step": 0, "tokens": 0, "val_loss": val})
        log(f"step {0:>6} | val loss {val:.4f}")

    lr_at = learning_rate(t)
    t_start = window_start = time.time()
    window_steps, last_val, pending = 0, None, None

    def record(done: int, metrics) -> None:
        """Read a finished step's metrics; log at intervals; stop on a non-finite loss."""
        nonlocal window_start, window_steps
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = ckpt.latest_step()
            where = (f"The last good checkpoint is step {last} in {ckpt.directory}; resume from it with "
                     "--train.resume=true and " if last is not None else "No checkpoint was written yet; ")
            raise UserError(f"the loss became {loss} (gradient norm {grad_norm}) at step {done}, so training stopped. "
                            f"{where}lower --train.lr or raise --train.warmup_steps.")
        history["loss"][done] = loss
        if done % t.log_interval == 0 or done == t.max_steps:
            elapsed = time.time() - window_start
            rate = window_steps * tokens_per_step / max(elapsed, 1e-9)
            eta = (t.max_steps - done) * elapsed / max(window_steps, 1)
            lr = float(lr_at(done - 1))
            metrics_log.write({"step": done, "tokens": done * tokens_per_step, "loss": loss, "lr": lr,
                               "grad_norm": grad_norm, "tokens_per_s": rate})
            log(f"step {done:>6} | loss {loss:.4f} | lr {lr:.2e} | {rate:,.0f} tok/s | left {_fmt_time(eta)}")
            window_start, window_steps = time.time(), 0

    done = start
    for step in range(start, t.max_steps):
        x, y = data_lib.train_batch(ds, cfg.model.block_size, t.seed, step, t.grad_accum, t.batch_size)
        state, metrics = strategy.train_step(state, x, y, dropout_key)
        window_steps += 1
        # the previous step's metrics are read only now, so the host never waits on the step in flight
        if pending is not None:
            record(*pending)
        done, pending = step + 1, (step + 1, strategy.first(metrics))
        evaluating = done % t.eval_interval == 0 or done == t.max_steps
        checkpointing = done % t.ckpt_interval == 0 or done == t.max_steps or done == stop_after
        if evaluating or checkpointing:
            record(*pending)
            pending = None
        if evaluating:
            last_val = evaluate(state)
            history["val_loss"][done] = last_val
            metrics_log.write({"step": done, "tokens": done * tokens_per_step, "val_loss": last_val})
            log(f"step {done:>6} | val loss {last_val:.4f}")
        if checkpointing:
            save(state, done, last_val if evaluating else None)
        if done == stop_after:
            break
    if pending is not None:
        record(*pending)
    ckpt.wait()
    ckpt.close()
    log(f"done: {done} steps in {_fmt_time(time.time() - t_start)}; checkpoints in {ckpt.directory}")

    if t.sample_tokens > 0:
        host = strategy.get_state(state)
        ids = generate_ids(graphdef, host["params"], [[tok.eot_id]], block_size=cfg.model.block_size,
                           eot_id=tok.eot_id, max_new_tokens=t.sample_tokens, temperature=0.8, top_k=200,
                           seed=t.seed)[0]
        log("sample:\n" + tok.decode(ids))
    history["params"] = n_params
    history["step_compilations"] = strategy.traces
    return history

