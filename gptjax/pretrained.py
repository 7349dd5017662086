"""Open a trained model in one call: `gptjax.load(run_dir)`, for notebooks and scripts."""

from __future__ import annotations

import codecs
import functools
import math
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.checkpoint import CHECKPOINTS, CheckpointVanished, find_checkpoint, read_meta, read_state
from gptjax.config import Config, ModelConfig
from gptjax.options import from_dict
from gptjax.errors import UserError
from gptjax.generate import stream_ids
from gptjax.model import GPT
from gptjax.tokenizer import get_tokenizer


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_logprobs(params, ids_1T, targets_1T, *, graphdef):
    """log p(targets[t] | ids[:t+1]) at every position of one window (float32)."""
    logits_1TV = nnx.merge(graphdef, params)(ids_1T)
    logp_1TV = jax.nn.log_softmax(logits_1TV, axis=-1)  # padded ids are -inf: no mass
    return jnp.take_along_axis(logp_1TV, targets_1T[..., None], axis=-1)[..., 0]


class Pretrained:
    """A restored model with its config and tokenizer: `generate` and `stream` turn prompts into
    continuations, `logprobs` and `perplexity` score a text."""

    STREAM_CHUNK = 8  # tokens per return to Python when streaming: shown promptly, decoded at full speed

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

    def _stream_ids(self, texts: list[str], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    seed: int, chunk: int):
        return stream_ids(self.graphdef, self.params, [self.tokenizer.encode(t) for t in texts],
                          block_size=self.config.model.block_size, eot_id=self.tokenizer.eot_id,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, chunk=chunk)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 100, temperature: float = 0.8,
                 top_k: int = 200, top_p: float = 1.0, seed: int = 0, batch_size: int = 16) -> str | list[str]:
        """The continuation of each prompt, as text without the prompt; a list for a list.

        Prompts are decoded together, `batch_size` at a time; temperature 0 is greedy, top_k 0
        and top_p 1 turn those filters off, and the same seed gives the same text.
        """
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        out: list[str] = []
        for i in range(0, len(texts), max(1, batch_size)):
            batch = texts[i:i + max(1, batch_size)]
            ids: list[list[int]] = [[] for _ in batch]
            for new in self._stream_ids(batch, max_new_tokens, temperature, top_k, top_p, seed, chunk=0):
                for r, piece in enumerate(new):
                    ids[r] += piece
            out += [self.tokenizer.decode(i) for i in ids]
        return out[0] if single else out

    def stream(self, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 200,
               top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
        """The continuation of one prompt in pieces as they are decoded; joined, they are `generate`'s text.

        A character split over several tokens is held back until it is complete.
        """
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for new in self._stream_ids([prompt], max_new_tokens, temperature, top_k, top_p, seed, self.STREAM_CHUNK):
            piece = text.decode(self.tokenizer.decode_bytes(new[0]))
            if piece:
                yield piece
        tail = text.decode(b"", final=True)
        if tail:
            yield tail

    def logprobs(self, text: str) -> np.ndarray:
        """log p(token t | the tokens before it) for every token of `text` but the first (float32).

        A text longer than the context is scored in windows of block_size tokens that advance by
        half of it, so every token past the first window has at least block_size/2 tokens before it.
        """
        ids = np.asarray(self.tokenizer.encode(text), np.int32)
        T = self.config.model.block_size
        stride = max(1, T // 2)
        out = np.zeros(max(len(ids) - 1, 0), np.float32)
        scored = 0  # targets 1..scored are done
        start = 0
        while scored < len(ids) - 1:
            window = ids[start:start + T + 1]  # inputs window[:-1], targets window[1:]
            x = np.zeros((1, T), np.int32)
            y = np.zeros((1, T), np.int32)
            x[0, :len(window) - 1], y[0, :len(window) - 1] = window[:-1], window[1:]
            logp = np.asarray(_window_logprobs(self.params, x, y, graphdef=self.graphdef))[0]
            first = scored - start  # the window's first target not yet scored
            out[scored:start + len(window) - 1] = logp[first:len(window) - 1]
            scored = start + len(window) - 1
            start += stride
        return out

    def perplexity(self, text: str) -> float:
        """exp(the mean negative log-probability of the tokens of `text` after the first)."""
        logp = self.logprobs(text)
        if logp.size == 0:
            n = len(self.tokenizer.encode(text))
            raise UserError(f"perplexity needs a text of at least two tokens; {text!r} has {n}.")
        return float(math.exp(-float(logp.mean())))

    def __repr__(self):
        m = self.config.model
        return (f"Pretrained({str(self.path)!r}, step={self.step}, {m.n_layer} layers, {m.n_head} heads, "
                f"width {m.n_embd}, context {m.block_size}, tokenizer {self.tokenizer.name!r})")


MAX_VANISHED = 20  # checkpoints deleted under a reader in a row before it gives up


@functools.lru_cache(maxsize=8)
def _abstract_model(model_cfg: ModelConfig):
    """The model's graph and its parameters' shapes, built once per shape: a notebook that reloads a
    training run every few seconds pays for this once."""
    graphdef, params_like = nnx.split(nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0))), nnx.Param)
    return graphdef, nnx.to_pure_dict(params_like)


def _read(run_dir: Path, step: int) -> Pretrained:
    meta = read_meta(run_dir / CHECKPOINTS, step)
    config = from_dict(Config, meta["config"], where=" in the checkpoint's config")
    graphdef, params_like = _abstract_model(config.model)
    params, _ = read_state(run_dir / CHECKPOINTS, step, params_like)
    return Pretrained(config, graphdef, params, step, run_dir)


def load(path: str | Path, step: int | None = None) -> Pretrained:
    """Restore the parameters of a run directory's latest checkpoint (or of `step`) on the default device.

    A run that is still training may delete a checkpoint (retention) while it is being read: the
    newest complete one is then read instead, so loading a live run always gives its newest model.
    'hf:DIR' reads a local Hugging Face GPT-2 folder instead (gptjax.convert).
    """
    if str(path).startswith("hf:"):
        from gptjax.convert import load_hf  # imported here: convert imports this module

        return load_hf(path, step)
    one_step = (step is not None and step >= 0) or Path(path).name.isdigit()
    for _ in range(MAX_VANISHED):
        run_dir, chosen = find_checkpoint(path, step)
        try:
            return _read(run_dir, chosen)
        except CheckpointVanished as e:
            if one_step:  # that step was asked for: no other will do
                raise
            vanished = e
    raise UserError(f"{MAX_VANISHED} checkpoints of {run_dir} in a row were deleted while they were being read: "
                    f"the run writes them faster than they can be read here. Read one step that it keeps "
                    f"(step=...), or raise its --train.ckpt_interval. The last one: {vanished}")
