"""What a run settles before its first step: the config completed by its tokenizer, the model's structure
and initial parameters, a checkpoint read into the run's layout, and the checks that a resume or a
fine-tune's source fits the run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.weights import sources as weights
from gptjax.weights.checkpoint import Checkpointer
from gptjax.config import Config
from gptjax.errors import UserError
from gptjax.model.gpt import GPT, abstract
from gptjax.options import from_dict, to_dict
from gptjax.model.stacked import relayout
from gptjax.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_meta


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


def model_init(cfg: Config):
    """The model's structure, and a pure function that draws its initial parameters as plain nested dicts
    (clean names in checkpoints), for jit to compile into any layout. The blocks are drawn per layer and
    then stacked if --model.scan_layers: a seed gives the same weights in either layout."""
    graphdef, _ = abstract(cfg.model)
    per_layer = dataclasses.replace(cfg.model, scan_layers=False)

    def make_params():
        params = nnx.state(GPT(per_layer, nnx.Rngs(params=jax.random.key(cfg.train.seed))), nnx.Param)
        return relayout(nnx.to_pure_dict(params), cfg.model.scan_layers)

    return graphdef, make_params


def init_model(cfg: Config):
    """The model's structure and its initial parameters, whole on the default device."""
    graphdef, make_params = model_init(cfg)
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
    src = weights.read(cfg.train.init_from)
    # a model reads only its own tokens: the fine-tune takes its source's tokenizer, whatever the preset's
    data = dataclasses.replace(cfg.data, tokenizer=src.tokenizer.name)
    model = dataclasses.replace(src.config.model, dropout=cfg.model.dropout, dtype=cfg.model.dtype,
                                scan_layers=cfg.model.scan_layers)
    return dataclasses.replace(cfg, model=model, data=data), src
