"""Where a model's weights come from: a run directory (its newest checkpoint, or one step) or a local
Hugging Face GPT-2 folder ('hf:DIR'). One reader for everything that starts from trained weights:
`gptjax.load`, sampling, a fine-tune (--train.init_from) and `gptjax convert to-hf`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

from gptjax.weights import hf
from gptjax.weights.checkpoint import CHECKPOINTS, CheckpointVanished, find_checkpoint, read_meta, read_state
from gptjax.config import Config
from gptjax.errors import UserError
from gptjax.model.gpt import abstract
from gptjax.options import from_dict
from gptjax.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_meta

MAX_VANISHED = 20  # checkpoints deleted under a reader in a row before it gives up


class Weights(NamedTuple):
    config: Config       # the model's config as it was trained (with the compute dtype asked for)
    params: Any          # nested dicts of arrays, in the layer layout of config.model.scan_layers
    step: int
    path: Path           # the run directory, or the Hugging Face folder
    tokenizer: Tokenizer


def with_dtype(config: Config, dtype: str | None) -> Config:
    """The config with another compute dtype (float32, bfloat16 or auto); None keeps the checkpoint's."""
    if dtype is None:
        return config
    if dtype not in ("float32", "bfloat16", "auto"):
        raise UserError(f"dtype must be float32, bfloat16 or auto; got {dtype!r}.")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=dtype))


def _read_step(run_dir: Path, step: int, dtype: str | None) -> Weights:
    meta = read_meta(run_dir / CHECKPOINTS, step)
    config = with_dtype(from_dict(Config, meta["config"], where=" in the checkpoint's config"), dtype)
    params, _ = read_state(run_dir / CHECKPOINTS, step, abstract(config.model)[1])
    return Weights(config, params, step, run_dir, tokenizer_from_meta(meta))


def read(source: str | Path, step: int | None = None, dtype: str | None = None) -> Weights:
    """The weights of `source`: a run directory's newest checkpoint (or `step`), a checkpoint folder
    itself, or 'hf:DIR'. A run that is still training may delete a checkpoint (retention) while it is
    being read: the newest complete one is then read instead, so a live run always gives its newest
    model. `dtype` sets the compute dtype in the config; parameters are kept as stored."""
    if str(source).startswith("hf:"):
        if step not in (None, -1, 0):
            raise UserError(f"{source} is a Hugging Face folder with one set of weights; it has no step {step}.")
        config, params = hf.from_hf(source)
        return Weights(with_dtype(config, dtype), params, 0, hf.hf_folder(source), get_tokenizer("gpt2"))
    one_step = (step is not None and step >= 0) or Path(source).name.isdigit()
    for _ in range(MAX_VANISHED):
        run_dir, chosen = find_checkpoint(source, step)
        try:
            return _read_step(run_dir, chosen, dtype)
        except CheckpointVanished as e:
            if one_step:  # that step was asked for: no other will do
                raise
            vanished = e
    raise UserError(f"{MAX_VANISHED} checkpoints of {run_dir} in a row were deleted while they were being read: "
                    f"the run writes them faster than they can be read here. Read one step that it keeps "
                    f"(step=...), or raise its --train.ckpt_interval. The last one: {vanished}")
