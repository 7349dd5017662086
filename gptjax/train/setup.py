"""What a run decides before its first step, as one frozen Plan that the training loop, the evaluations
and the saves read: the run directory and the checkpoint it resumes from, the config completed by the
tokenizer (or taken from a fine-tune's source), the compute dtype and why, the data and its tokenizer, the
eval tasks, the devices and the batch cut over them, the strategy, and the figures its progress is
measured by.

set_up decides them one step after another, each checking what it can before the next, more costly one
(inputs before data, data before the model). Below it, the parts the bench and the tools use too: the
config completed by a tokenizer, the model's structure and initial parameters, a checkpoint read into the
run's layout, and the checks that a resume or a fine-tune's source fits the run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import data as data_lib
from gptjax.weights import sources
from gptjax.weights.checkpoint import CHECKPOINTS, Checkpointer, checkpoint_bytes, remove_partial
from gptjax.config import Config
from gptjax.data import Dataset, align, mix
from gptjax.data import mixture as mixture_lib
from gptjax.errors import UserError
from gptjax.eval.tasks import read_tasks
from gptjax.model import documents
from gptjax.model.documents import Documents
from gptjax.model.gpt import GPT, abstract, count_params
from gptjax.model.products import auto_inputs
from gptjax.options import from_dict, to_dict
from gptjax.model.stacked import relayout
from gptjax.runtime import precision
from gptjax.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_meta
from gptjax.train import distributed
from gptjax.train.flops import flops_per_token, peak_flops
from gptjax.train.logs import check_wandb_installed
from gptjax.train.optim import make_optimizer
from gptjax.train.parallel import STRATEGIES, describe, parse_mesh, plan_batch, select_devices
from gptjax.train.saving import AFTER_FAILURE


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run decided before its first step (set_up); none of it changes while the run trains."""

    cfg: Config                  # complete: the vocabulary filled in, a fine-tune's model, the concrete dtype
    given_dtype: str             # --model.dtype as given, which the run records (auto stays auto)
    run_dir: Path
    resume_from: int | None      # the step of the checkpoint the run continues from; None for a new run
    elapsed_before: float        # seconds trained by the run's earlier starts
    compute: precision.Decision  # the compute dtype and why, as the header says it
    compute_reason: str          # the why that checkpoints record (for auto, the run's first start's)
    ds: Dataset
    tok: Tokenizer
    tasks: list                  # the eval tasks of --train.eval_tasks, read and checked
    devices: list
    mesh_shape: tuple[int, int]  # (data, model)
    accum: int                   # micro-batches per step
    micro: int                   # sequences per micro-batch
    graphdef: Any
    strategy: Any                # a gptjax.train.parallel strategy: the placement and the compiled step
    n_params: int
    tokens_per_step: int
    flops_per_step: float
    peak: float | None           # the devices' peak FLOP/s together, where their data sheet is known
    checkpoint_bytes: int        # the size of one checkpoint of this model and optimizer
    val_bytes: int               # the bytes the validation batches' targets cover (the same at every evaluation)
    mixture: Any = None          # a gptjax.data.mixture.Mixture with --data.mix, else None
    source_val_bytes: tuple = ()  # with a mixture: val_bytes of each source's own validation batches
    aligned: Any = None          # with --data.align=bos (and no mixture): the train split's aligned windows

    @property
    def start_step(self) -> int:
        """The first step this start trains: the resume point's, or 0 for a new run."""
        return self.resume_from or 0

    def as_given(self) -> Config:
        """The config as the run is recorded: its dtype as given (auto stays auto, for readers elsewhere)."""
        return dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, dtype=self.given_dtype))


def set_up(cfg: Config, log) -> tuple[Plan, Checkpointer, dict]:
    """Decide the run in `cfg.out_dir`, whose lock the caller holds. Returns the plan, the run's checkpointer
    (its folder created only once the inputs and the data are checked) and the training state to start from."""
    run_dir = Path(cfg.out_dir)
    mix.check(cfg.data)  # the mixture's mistakes are told before anything else
    cfg, given_vocab, source = _settle_config(cfg)
    # task files are read before any data is prepared, so that their mistakes cost nothing; a tokenizer
    # learned from the corpus is known only once the data is, and its tasks are read then
    known_tok = source.tokenizer if source else (
        None if cfg.data.tokenizer == "bpe" else get_tokenizer(cfg.data.tokenizer))
    tasks = _read_tasks(cfg.train.eval_tasks, known_tok, cfg.model.block_size, log) if known_tok else []
    ckpt, latest, saved = _find_resume_point(cfg, run_dir, log)
    given_dtype = cfg.model.dtype
    devices, mesh_shape, accum, micro = _plan_devices(cfg.train, log)
    mixture = _load_mixture(cfg, run_dir, source, log) if cfg.data.mix else None
    ds = mixture_lib.as_dataset(mixture) if mixture else _load_data(cfg, run_dir, source, log)
    aligned = (align.of_split(ds.train, ds.tokenizer.eot_id, cfg.model.block_size, "train", log)
               if cfg.data.align == "bos" and not mixture else None)
    if known_tok is None:
        tasks = _read_tasks(cfg.train.eval_tasks, ds.tokenizer, cfg.model.block_size, log)
    cfg = _complete_config(cfg, ds.tokenizer, given_vocab, latest, saved, run_dir)
    # once the model's shape is whole (the vocabulary), before anything is traced: auto times its products
    cfg, compute, compute_reason = _settle_dtype(cfg, saved, micro * cfg.model.block_size // mesh_shape[0])
    t = cfg.train
    ckpt = ckpt or Checkpointer(run_dir, keep=t.keep_checkpoints, then=AFTER_FAILURE)
    docs = documents.of_run(cfg.data, ds.tokenizer.eot_id)  # the model stops attention at the data's end-of-text
    graphdef, strategy, shapes, state = _build_state(cfg, docs, devices, ckpt, latest, saved, source, log)
    n_params = count_params(shapes["params"])
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
    peak = peak_flops(devices[0])
    plan = Plan(cfg=cfg, given_dtype=given_dtype, run_dir=run_dir, resume_from=latest,
                elapsed_before=float(saved.get("elapsed_s", 0.0)) if saved is not None else 0.0,
                compute=compute, compute_reason=compute_reason, ds=ds, tok=ds.tokenizer, tasks=tasks,
                devices=devices, mesh_shape=mesh_shape, accum=accum, micro=micro, graphdef=graphdef,
                strategy=strategy, n_params=n_params, tokens_per_step=tokens_per_step,
                flops_per_step=flops_per_token(cfg.model, n_params) * tokens_per_step,
                peak=peak * len(devices) if peak else None,
                checkpoint_bytes=checkpoint_bytes(shapes["params"], shapes["opt_state"]),
                val_bytes=_val_bytes(ds, cfg, micro), mixture=mixture,
                source_val_bytes=tuple(_val_bytes(d, cfg, micro) for d in mixture.datasets) if mixture else (),
                aligned=aligned)
    return plan, ckpt, state


def _settle_config(cfg: Config):
    """The run's config with the vocabulary size filled in, and for a fine-tune its source's model and
    tokenizer. Returns (cfg, the vocabulary size as given, the fine-tune's source or None)."""
    given_vocab = cfg.model.vocab_size
    cfg = resolve(cfg)
    if cfg.train.wandb:
        check_wandb_installed(cfg.train.wandb)
    source = None
    if cfg.train.init_from:
        cfg, source = adopt_source_model(cfg)
        given_vocab = cfg.model.vocab_size
    return cfg, given_vocab, source


def _read_tasks(spec: str, tok, block_size: int, log) -> list:
    tasks = read_tasks(spec, tok, block_size) if spec else []
    for task in tasks:
        log(f"eval task {task.name}: {len(task.examples):,} {task.kind.replace('_', ' ')} examples from {task.path}")
        if task.warning():
            log(task.warning())
    return tasks


def _find_resume_point(cfg: Config, run_dir: Path, log):
    """The newest intact checkpoint to continue from, or None for a new run; refuses to write over a
    run that was not asked to resume, and a checkpoint of another model. Returns (the checkpointer of a
    run that has checkpoints or None, the step or None, its meta or None)."""
    t = cfg.train
    # open (and so create) the checkpoint folder only once the inputs have been checked
    existing = (run_dir / CHECKPOINTS).is_dir()
    if existing and distributed.is_primary():
        remove_partial(run_dir / CHECKPOINTS)  # left by a save that was killed or refused by a full disk
    ckpt = Checkpointer(run_dir, keep=t.keep_checkpoints, create=False, then=AFTER_FAILURE) if existing else None
    latest = ckpt.latest_step() if ckpt else None
    if latest is not None and not t.resume:
        raise UserError(f"{run_dir} already holds checkpoints (latest: step {latest}). Pass --train.resume=true "
                        "to continue that run, or choose another --out_dir; nothing was changed.")
    if t.resume and latest is None:
        log(f"resume: no checkpoint in {run_dir} yet; starting from scratch")
    saved = None
    if latest is not None:
        saved = ckpt.read_meta(latest)
        check_resumable(saved, cfg, run_dir)
    return ckpt, latest, saved


def _settle_dtype(cfg: Config, saved: dict | None, tokens: int):
    """The compute dtype the model is built in, decided before anything is traced (auto's measurement runs
    real products: the step's own, at its `tokens` per device): as set, or what auto stands for here (the
    same on every process of the run), or for a resumed auto run the one it started with, so that a resume
    computes what the run computed. The config written to the run keeps the dtype as given. Returns (cfg
    with the concrete dtype, the decision for the header, the reason checkpoints record)."""
    if cfg.model.dtype != "auto":
        decision = precision.explain(cfg.model.dtype)
        return cfg, decision, decision.why
    if saved is not None and saved.get("compute_dtype") in ("float32", "bfloat16"):
        reason = saved.get("compute_why", "not recorded")
        decision = precision.Decision(saved["compute_dtype"], f"auto: as this run decided at its start, {reason}; "
                                      "--model.dtype= changes it")
    else:
        shape, measure = auto_inputs(cfg.model, tokens)
        if jax.process_count() > 1:  # every process computes alike: bfloat16 only where all chose it
            mine = precision.decide(shape, measure).dtype
            precision.agree(not distributed.any_process(mine != "bfloat16"), shape, measure)
        reason = precision.decide(shape, measure).why
        decision = precision.explain("auto", shape, measure)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=decision.dtype)), decision, reason


def _plan_devices(t, log):
    """The devices, and the batch cut into micro-batches that split evenly over them.
    Returns (devices, mesh shape (data, model), micro-batches per step, sequences per micro-batch)."""
    devices = select_devices(t.devices)
    mesh_shape = parse_mesh(t.mesh, len(devices), jax.process_count())
    accum, micro = plan_batch(t.batch_size, t.grad_accum, mesh_shape[0], jax.process_count())
    if (accum, micro) != (t.grad_accum, t.batch_size):
        log(f"batch: {t.grad_accum} x {t.batch_size} sequences re-cut as {accum} x {micro}, "
            f"which splits evenly over {describe(devices)}")
    return devices, mesh_shape, accum, micro


def _load_data(cfg: Config, run_dir: Path, source, log) -> Dataset:
    """The token shards (prepared by process 0 first, if they are not ready) and their tokenizer."""
    ds = distributed.process_0_first(lambda: data_lib.load(
        cfg.data, run_dir / "data", log=log, tokenizer=source.tokenizer if source else None))
    data_lib.check_fits(ds, cfg.model.block_size)
    return ds


def _val_bytes(ds: Dataset, cfg: Config, micro: int) -> int:
    t = cfg.train
    return sum(ds.tokenizer.count_bytes(data_lib.val_batch(ds, cfg.model.block_size, t.seed, i, micro)[1])
               for i in range(t.eval_batches))


def _load_mixture(cfg: Config, run_dir: Path, source, log):
    """The sources of --data.mix, checked, then prepared by process 0 first (gptjax.data.mixture)."""
    return distributed.process_0_first(lambda: mixture_lib.load(
        cfg.data, run_dir / "data", cfg.model.block_size, log=log, tokenizer=source.tokenizer if source else None))


def _complete_config(cfg: Config, tok: Tokenizer, given_vocab, latest, saved, run_dir: Path) -> Config:
    """The config with the vocabulary a learned tokenizer has, checked against the checkpoint's."""
    cfg = resolve(cfg, tok, given_vocab)
    if latest is not None and tok.ranks_text:
        check_same_tokenizer(saved, tok, run_dir)
        check_resumable(saved, cfg, run_dir)
    return cfg


def _build_state(cfg: Config, docs, devices: list, ckpt: Checkpointer, latest, saved, source, log):
    """The strategy, and the training state created, restored or taken from the fine-tune's source
    straight into its layout: with fsdp no process holds the whole state. `docs`: the model's
    document rule (gptjax.model.documents), None for one causal stream.
    Returns (the model's structure, the strategy, the state's shapes, the state)."""
    t = cfg.train
    graphdef, make_params = model_init(cfg, docs)
    tx = make_optimizer(t)

    def make_state():
        params = make_params()
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    shapes = jax.eval_shape(make_state)
    strategy = STRATEGIES[t.parallel](graphdef, tx, cfg.model.dropout, devices, t.on_nonfinite == "skip",
                                      loss_chunk=t.loss_chunk, remat=t.remat, mesh=t.mesh)
    if latest is not None:
        state = strategy.put_state(restore_state(ckpt, latest, saved, shapes, strategy, cfg.model.scan_layers))
        log(f"resume: continuing from step {latest} of {Path(cfg.out_dir)}")
    elif source is not None:  # read whole, as sampling reads it
        params = relayout(source.params, cfg.model.scan_layers)
        state = strategy.put_state({"params": params, "opt_state": jax.jit(tx.init)(params), "step": jnp.int32(0)})
        log(f"init: weights from {t.init_from}")
    else:
        state = strategy.init_state(make_state)
    return graphdef, strategy, shapes, state


def resolve(cfg: Config, tok: Tokenizer | None = None, given_vocab: int | None = None) -> Config:
    """Fill in what depends on the tokenizer: the vocabulary size (`given_vocab`, default the config's,
    if one was set, else the tokenizer's). Without `tok`, a learned bpe is taken at its full
    --data.bpe_vocab (what a tool that needs only shapes wants); the run sets the size it learned once
    the data is ready."""
    given = cfg.model.vocab_size if given_vocab is None else given_vocab
    if tok is None and cfg.data.tokenizer == "bpe":
        size, name = cfg.data.bpe_vocab + 1, "bpe"
    else:
        tok = tok or get_tokenizer(cfg.data.tokenizer)
        size, name = tok.vocab_size, tok.name
    vocab = given or size
    if vocab < size:
        raise UserError(f"--model.vocab_size={vocab} is smaller than the {name} tokenizer's {size}; "
                        "use 0 to take the tokenizer's.")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def model_init(cfg: Config, docs: Documents | None = None):
    """The model's structure (with its document rule `docs`), and a pure function that draws its initial
    parameters as plain nested dicts (clean names in checkpoints), for jit to compile into any layout. The
    blocks are drawn per layer and then stacked if --model.scan_layers: a seed gives the same weights in
    either layout (and with or without docs, which hold no parameters)."""
    graphdef, _ = abstract(cfg.model, docs=docs)
    per_layer = dataclasses.replace(cfg.model, scan_layers=False)

    def make_params():
        params = nnx.state(GPT(per_layer, nnx.Rngs(params=jax.random.key(cfg.train.seed))), nnx.Param)
        return relayout(nnx.to_pure_dict(params), cfg.model.scan_layers)

    return graphdef, make_params


def init_model(cfg: Config, docs: Documents | None = None):
    """The model's structure and its initial parameters, whole on the default device."""
    graphdef, make_params = model_init(cfg, docs)
    return graphdef, jax.jit(make_params)()


def restore_state(ckpt: Checkpointer, step: int, saved: dict, shapes: dict, strategy, stacked: bool) -> dict:
    """The checkpoint of `step` read straight into the strategy's placement (fsdp: each process reads only
    its own shards), in the checkpoint's layer layout, then converted to this run's (gptjax.model.stacked)."""
    saved_stacked = bool(saved["config"]["model"].get("scan_layers", False))
    like = relayout({"params": shapes["params"], "opt_state": shapes["opt_state"]}, saved_stacked)
    like = jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), like,
                        strategy.placement(like))
    params, opt_state = ckpt.restore(step, like["params"], like["opt_state"])
    state = {"params": params, "opt_state": opt_state}
    if saved_stacked != stacked:
        state = jax.jit(lambda s: relayout(s, stacked), out_shardings=strategy.placement(
            {"params": shapes["params"], "opt_state": shapes["opt_state"]}))(state)
    return {**state, "step": jnp.int32(step)}


def check_resumable(saved: dict, cfg: Config, run_dir: Path) -> None:
    """The model (but its compute dtype, which may differ between machines), tokenizer and optimizer
    (its state's structure) must be those of the checkpoint. A learned tokenizer's size and merges are
    known only once the data is ready: check_same_tokenizer then."""
    saved_cfg = from_dict(Config, saved["config"], where=" in the checkpoint's config")
    # the layer layout may differ too: a checkpoint restores in either (gptjax.model.stacked)
    unknown = ("dtype", "scan_layers", "vocab_size") if cfg.data.tokenizer == "bpe" else ("dtype", "scan_layers")
    diffs = [f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in {
        **{f"model.{k}": (v, getattr(cfg.model, k)) for k, v in to_dict(saved_cfg.model).items() if k not in unknown},
        "data.tokenizer": (saved_cfg.data.tokenizer, cfg.data.tokenizer),
        "train.optimizer": (saved_cfg.train.optimizer, cfg.train.optimizer),
    }.items() if a != b]
    if diffs:
        raise UserError(f"cannot resume {run_dir}: its checkpoint was trained with another model, tokenizer or "
                        f"optimizer ({'; '.join(diffs)}). Resume with the same settings, or start a new --out_dir.")


def check_same_tokenizer(saved: dict, tok: Tokenizer, run_dir: Path) -> None:
    if not tokenizer_from_meta(saved).same_as(tok):
        raise UserError(f"cannot resume {run_dir}: its checkpoint's learned bpe tokenizer is not the one the data "
                        "was prepared with now (the corpus changed, or --data.bpe_vocab). Resume with the corpus and "
                        "settings of the run, or start a new --out_dir.")


def adopt_source_model(cfg: Config):
    """For --train.init_from: the config with the source's model shape (keeping this run's dropout, dtype
    and layer layout) and tokenizer (a learned one then tokenizes this run's corpus too), and the source."""
    src = sources.read(cfg.train.init_from)
    # a model reads only its own tokens: the fine-tune takes its source's tokenizer, whatever the preset's
    data = dataclasses.replace(cfg.data, tokenizer=src.tokenizer.name)
    model = dataclasses.replace(src.config.model, dropout=cfg.model.dropout, dtype=cfg.model.dtype,
                                scan_layers=cfg.model.scan_layers)
    return dataclasses.replace(cfg, model=model, data=data), src
