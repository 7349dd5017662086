"""gptjax as a model of EleutherAI's lm-evaluation-harness (`pip install "gptjax[lm-eval]"`):

    lm_eval --model gptjax --model_args path=out/run --tasks hellaswag,lambada_openai
    lm_eval --model gptjax --model_args path=hf:gpt2,step=-1,stride=512 --tasks wikitext --batch_size 16

model_args: path (a run directory, a checkpoint step directory or hf:DIR), step (-1: the latest),
stride (rolling log-likelihood windows; 0: the context, the harness's own non-overlapping windows),
batch_size (also the harness's --batch_size; 'auto' takes 8).

The harness has no plugin discovery for models: the package installs `gptjax-lm-eval.pth`, which
registers the name "gptjax" the moment the harness imports its own models (gptjax/eval/lm_eval_hook.py),
so the stock `lm_eval` command finds it; importing this module registers it too. Requests run on
gptjax's compiled paths: log-likelihoods through the task scorer (requests sorted by length, padded
to powers of two), rolling log-likelihoods through the sliding windows of `python -m gptjax.eval
--text` (one shape), and generation through Pretrained.generate with the request's stop strings.
"""

from __future__ import annotations

import itertools
import json

import lm_eval.models  # noqa: F401  the harness's own models first: its registry imports them only while empty
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

from gptjax.eval.text import check_stride
from gptjax.inference.pretrained import load
from gptjax.model.score import Scorer, sliding_windows

DEFAULT_BATCH = 8
MAX_GEN_TOKS = 256  # the harness's default for generation requests that do not say


class GptjaxLM(TemplateLM):
    def __init__(self, path: str, step: int | str = -1, stride: int | str = 0, batch_size: int | str = DEFAULT_BATCH,
                 max_gen_toks: int | str = MAX_GEN_TOKS, **_harness_options):  # device, max_batch_size: not used
        super().__init__()
        self.model = load(str(path), None if int(step) < 0 else int(step))
        self.tok = self.model.tokenizer
        self.T = self.model.config.model.block_size
        self.stride = int(stride) or self.T
        check_stride(self.stride, self.T)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(self.model.graphdef, self.model.params, self.T, self.batch_size)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.T

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether it is the greedy continuation) of each tokenized request;
        a request longer than the context keeps its last block_size + 1 tokens, as the harness's own models do."""
        pairs = []
        for _, context, continuation in requests:
            seq = (list(context) + list(continuation))[-(self.T + 1):]
            n = min(len(continuation), len(seq) - 1)
            pairs.append((seq[:-n], seq[-n:]))
        results = self.scorer.requests(pairs)
        for (args, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(the whole string), every token after an end-of-text, in windows of the context every `stride`."""
        windows = (sliding_windows([np.asarray([self.eot_token_id, *self.tok_encode(r.args[0])])], self.T,
                                   self.stride, tag=i) for i, r in enumerate(requests))
        totals = [0.0] * len(requests)
        for s in self.scorer.windows(itertools.chain.from_iterable(windows)):  # windows of all strings, batched
            totals[s.tag] += float(np.sum(s.logp, dtype=np.float64))
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations that end before the first of the request's `until` strings, greedy unless it asks
        for sampling; requests with the same settings are decoded together, batch_size at a time."""
        out: list[str | None] = [None] * len(requests)
        settings = [self._controls(r.args[1]) for r in requests]
        key = lambda i: json.dumps(settings[i], sort_keys=True)  # noqa: E731
        for _, group in itertools.groupby(sorted(range(len(requests)), key=key), key=key):
            group = list(group)
            texts = self.model.generate([requests[i].args[0] for i in group], batch_size=self.batch_size,
                                        **settings[group[0]])
            for i, text in zip(group, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _controls(self, gen_kwargs: dict) -> dict:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        sample = bool(gen_kwargs.get("do_sample", False))
        return {"stop": until or None, "max_new_tokens": int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                "temperature": float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
                "top_k": int(gen_kwargs.get("top_k", 0) or 0), "top_p": float(gen_kwargs.get("top_p", 1.0) or 1.0),
                "seed": int(gen_kwargs.get("seed", 0) or 0)}


if "gptjax" not in model_registry:  # the hook registers a lazy name that resolves to this class
    model_registry.register("gptjax", target=GptjaxLM)
