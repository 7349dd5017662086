"""An out-of-memory failure told apart from others, and turned into what would fit instead."""

from __future__ import annotations

from gptjax.runtime import disk
from gptjax.config import Config
from gptjax.errors import UserError
from gptjax.model.gpt import resolve_dtype


def is_out_of_memory(error: Exception) -> bool:
    if disk.is_write_failure(error):  # tensorstore says RESOURCE_EXHAUSTED for a full disk too
        return False
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def out_of_memory_error(cfg: Config, error: Exception) -> UserError:
    """What would fit: the same tokens per step in smaller pieces, a lighter dtype, sharding, a smaller model."""
    t, m = cfg.train, cfg.model
    first_line = str(error).strip().splitlines()[0][:200]
    options = []
    if t.batch_size >= 2:
        options.append(f"--train.batch_size={t.batch_size // 2} --train.grad_accum={t.grad_accum * 2} "
                       "(the same tokens per step, half the activation memory)")
    if resolve_dtype(m) == "float32":
        options.append("--model.dtype=bfloat16 (half the activation memory)")
    if t.parallel == "pmap":
        options.append("--train.parallel=fsdp (parameters and optimizer state sharded over the devices)")
    options.append(f"a smaller --model.block_size (now {m.block_size}) or --model.n_layer (now {m.n_layer})")
    return UserError(f"the device ran out of memory ({first_line}). Options that need less: " + "; ".join(options)
                     + ". Checkpoints already written are intact.")
