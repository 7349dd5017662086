"""Open a trained model in one call: `gptjax.load(run_dir)`, for notebooks and scripts."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from gptjax.checkpoint import Checkpointer, find_checkpoint
from gptjax.config import Config, from_dict
from gptjax.errors import UserError
from gptjax.generate import generate_ids
from gptjax.model import GPT
from gptjax.tokenizer import get_tokenizer


class Pretrained:
    """A restored model with its config and tokenizer; `generate` turns prompts into continuations."""

    def __init__(self, config: Config, graphdef, params, step: int, path: Path):
        self.config = config
        self.tokenizer = get_tokenizer(config.data.tokenizer)
        self.graphdef = graphdef
        self.params = params
        self.step = step
        self.path = path

    @property
    def model(self) -> GPT:
        return nnx.merge(self.graphdef, self.params)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 100, temperature: float = 0.8,
                 top_k: int = 200, top_p: float = 1.0, seed: int = 0) -> str | list[str]:
        """The continuation of each prompt, as text without the prompt; a list for a list."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = generate_ids(self.graphdef, self.params, [self.tokenizer.encode(p) for p in texts],
                           block_size=self.config.model.block_size, eot_id=self.tokenizer.eot_id,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed)
        out = [self.tokenizer.decode(i) for i in ids]
        return out[0] if single else out

    def __repr__(self):
        m = self.config.model
        return (f"Pretrained({str(self.path)!r}, step={self.step}, {m.n_layer} layers, {m.n_head} heads, "
                f"width {m.n_embd}, context {m.block_size}, tokenizer {self.tokenizer.name!r})")


def load(path: str | Path, step: int | None = None) -> Pretrained:
    """Restore the parameters of a run directory's latest checkpoint (or of `step`) on the default device.

    'hf:DIR' reads a local Hugging Face GPT-2 folder instead (gptjax.convert).
    """
    if str(path).startswith("hf:"):
        from gptjax.convert import load_hf  # imported here: convert imports this module

        return load_hf(path, step)
    run_dir, step = find_checkpoint(path, step)
    ckpt = Checkpointer(run_dir, create=False)
    try:
        meta = ckpt.read_meta(step)
    except Exception as e:  # orbax raises several kinds on a damaged item
        raise UserError(f"checkpoint {ckpt.directory / str(step)} is corrupt: its meta item cannot be read ({e}).") from None
    config = from_dict(Config, meta["config"], where=" in the checkpoint's config")
    abstract = nnx.eval_shape(lambda: GPT(config.model, nnx.Rngs(0)))
    graphdef, params_like = nnx.split(abstract, nnx.Param)
    params, _ = ckpt.restore(step, nnx.to_pure_dict(params_like))
    ckpt.close()
    return Pretrained(config, graphdef, params, step, run_dir)
