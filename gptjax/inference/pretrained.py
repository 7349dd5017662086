"""Open a trained model in one call: `gptjax.load(run_dir)`, for notebooks and scripts."""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from flax import nnx


from gptjax.weights import sources
from gptjax.config import Config
from gptjax.errors import UserError
from gptjax.model import documents
from gptjax.model.score import Scorer, sliding_windows
from gptjax.inference.generate import GEMV_ROWS, output_matrix, stream_ids
from gptjax.model.gpt import GPT, abstract, resolve_dtype
from gptjax.inference.stops import StopText, check_stops
from gptjax.tokenizer import Tokenizer, get_tokenizer


class Pretrained:
    """A restored model with its config and tokenizer: `generate` and `stream` turn prompts into
    continuations, `logprobs` and `perplexity` score a text."""

    STREAM_CHUNK = 8  # tokens per return to Python when streaming: shown promptly, decoded at full speed

    def __init__(self, config: Config, graphdef, params, step: int, path: Path, tokenizer: Tokenizer | None = None):
        self.config = config
        self.tokenizer = tokenizer or get_tokenizer(config.data.tokenizer)
        self.graphdef = graphdef
        self.params = params
        self.step = step
        self.path = path
        self._head_of = self._head_DV = None
        self._scorer_of = self._scorer = None

    @property
    def dtype(self) -> str:
        """The compute dtype, 'float32' or 'bfloat16' (what the config's dtype, auto resolved, stands for)."""
        return resolve_dtype(self.config.model)

    @property
    def model(self) -> GPT:
        return nnx.merge(self.graphdef, self.params)

    def _head(self, n_prompts: int):
        """generate.output_matrix, made at the first sampling of at most GEMV_ROWS prompts and kept while
        the output layer's array is the same one (the copy's memory, 0.15 GB for GPT-2 124M in float32,
        against a transpose of it before every call)."""
        if n_prompts > GEMV_ROWS:
            return None
        layer = self.model.output_layer.embedding[...]
        if self._head_of is not layer:
            self._head_of, self._head_DV = layer, output_matrix(self.graphdef, self.params)
        return self._head_DV

    def _stream_ids(self, texts: list[str], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    seed: int, chunk: int, should_end=None):
        return stream_ids(self.graphdef, self.params, [self.tokenizer.encode(t) for t in texts],
                          head_DV=self._head(len(texts)),
                          block_size=self.config.model.block_size, eot_id=self.tokenizer.eot_id,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, chunk=chunk, should_end=should_end)

    def generate(self, prompts: str | list[str], max_new_tokens: int = 100, temperature: float = 0.8,
                 top_k: int = 200, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                 stop: str | list[str] | None = None) -> str | list[str]:
        """The continuation of each prompt, as text without the prompt; a list for a list.

        Prompts are decoded together, `batch_size` at a time; temperature 0 is greedy, top_k 0
        and top_p 1 turn those filters off, and the same seed gives the same text. Each
        continuation ends before the first of the `stop` strings it produces (that one decoding
        stops there; the others go on), and is otherwise the text it would be without them.
        """
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        stops = check_stops(stop)
        out: list[str] = []
        for i in range(0, len(texts), max(1, batch_size)):
            batch = texts[i:i + max(1, batch_size)]
            if stops:
                rows = [StopText(self.tokenizer, stops) for _ in batch]
                for _ in self._stream_ids(batch, max_new_tokens, temperature, top_k, top_p, seed, chunk=0,
                                          should_end=lambda r, ids: rows[r].feed(ids)):
                    pass
                out += [row.finish() for row in rows]
                continue
            ids: list[list[int]] = [[] for _ in batch]
            for new in self._stream_ids(batch, max_new_tokens, temperature, top_k, top_p, seed, chunk=0):
                for r, piece in enumerate(new):
                    ids[r] += piece
            out += [self.tokenizer.decode(i) for i in ids]
        return out[0] if single else out

    def stream(self, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int = 200,
               top_p: float = 1.0, seed: int = 0, stop: str | list[str] | None = None) -> Iterator[str]:
        """The continuation of one prompt in pieces as they are decoded; joined, they are `generate`'s text.

        A character split over several tokens is held back until it is complete, and with `stop`
        strings, a tail that could be the beginning of one.
        """
        stops = check_stops(stop)
        if stops:
            row = StopText(self.tokenizer, stops)
            for _ in self._stream_ids([prompt], max_new_tokens, temperature, top_k, top_p, seed, self.STREAM_CHUNK,
                                      should_end=lambda r, ids: row.feed(ids)):
                piece = row.take()
                if piece:
                    yield piece
            row.finish()
            tail = row.take()
            if tail:
                yield tail
            return
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for new in self._stream_ids([prompt], max_new_tokens, temperature, top_k, top_p, seed, self.STREAM_CHUNK):
            piece = text.decode(self.tokenizer.decode_bytes(new[0]))
            if piece:
                yield piece
        tail = text.decode(b"", final=True)
        if tail:
            yield tail

    def logprobs(self, text: str, from_start: bool = False) -> np.ndarray:
        """log p(token t | the tokens before it) for every token of `text` but the first (float32);
        with `from_start`, for every token, the first given the end-of-text token that starts a document.

        A text longer than the context is scored in windows of block_size tokens that advance by
        half of it, so every token past the first window has at least block_size/2 tokens before it.
        """
        ids = np.asarray(([self.tokenizer.eot_id] if from_start else []) + self.tokenizer.encode(text), np.int32)
        T = self.config.model.block_size
        if self._scorer_of is not self.params:  # made once, and again only for other parameters
            self._scorer_of, self._scorer = self.params, Scorer(self.graphdef, self.params, T, batch_size=1)
        scored = [s.logp for s in self._scorer.windows(sliding_windows([ids], T, max(1, T // 2)))]
        return np.concatenate(scored) if scored else np.zeros(0, np.float32)

    def bits_per_byte(self, text: str) -> float:
        """The model's cross-entropy on `text` in bits per UTF-8 byte: every token is scored, the first
        given the end-of-text token that starts a document, and the sum is divided by the text's bytes.
        Independent of the tokenizer, so models of different tokenizers compare."""
        nbytes = len(text.encode("utf-8"))
        if not nbytes:
            raise UserError("bits_per_byte needs a text of at least one character.")
        logp = self.logprobs(text, from_start=True)
        return float(-logp.sum() / (nbytes * math.log(2)))

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
                f"width {m.n_embd}, context {m.block_size}, tokenizer {self.tokenizer.name!r}, {self.dtype} compute)")


def load(path: str | Path, step: int | None = None, dtype: str | None = None) -> Pretrained:
    """Restore the parameters of a run directory's latest checkpoint (or of `step`) on the default device.

    A run that is still training may delete a checkpoint (retention) while it is being read: the
    newest complete one is then read instead, so loading a live run always gives its newest model.
    'hf:DIR' reads a local Hugging Face GPT-2 folder instead (gptjax.weights.hf). `dtype` sets the compute
    dtype: bfloat16 reads half the bytes per decoded token; parameters are kept as stored.
    """
    source = sources.read(path, step, dtype)
    # a run trained with --data.doc_mask is scored and sampled with its documents' mask, as it was trained
    graphdef, _ = abstract(source.config.model, docs=documents.of_run(source.config.data, source.tokenizer.eot_id))
    return Pretrained(source.config, graphdef, source.params, source.step, source.path, source.tokenizer)
