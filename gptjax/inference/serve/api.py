"""The OpenAI completions API's request fields, checked, and its response shapes.

A request is checked field by field before anything is decoded: an unknown field, a value of the
wrong type or out of range, or a prompt and max_tokens that do not fit the context is an ApiError,
answered 400 in OpenAI's error shape. The sampling controls go through config.check_sampling, the
rule every sampling call follows.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from gptjax.config import check_sampling
from gptjax.errors import UserError
from gptjax.inference.stops import check_stops
from gptjax.tokenizer import ENDOFTEXT

# field: (the types it takes, its default); OpenAI's other fields are refused by name
FIELDS = {
    "model": ((str,), None), "prompt": ((str, list), None), "max_tokens": ((int,), 16),
    "temperature": ((int, float), 1.0), "top_p": ((int, float), 1.0), "top_k": ((int,), 0),
    "seed": ((int,), 0), "stop": ((str, list), None), "n": ((int,), 1), "stream": ((bool,), False),
    "stream_options": ((dict,), None), "logprobs": ((int,), None), "echo": ((bool,), False), "user": ((str,), None),
}


class ApiError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    prompts: list[str]
    ids: list[list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stops: list[str]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


def _typed(body, fields: dict = FIELDS) -> dict:
    """The body's value (or default) of each of `fields`, checked for its type; an ApiError for a body that is not
    an object, an unknown field or a value of the wrong type."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object.")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ApiError(f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(fields)}.", unknown[0])
    values = {}
    for name, (types, default) in fields.items():
        value = body.get(name, default)
        if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            names = " or ".join("number" if t is float else {int: "integer", str: "string", list: "list", bool:
                                "boolean", dict: "object"}[t] for t in types if t is not int or float not in types)
            raise ApiError(f"{name} must be a {names}, got {value!r}.", name)
        values[name] = value
    return values


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _check_vocabulary(ids: list[int], tokenizer, param: str) -> None:
    if not all(0 <= i < tokenizer.vocab_size for i in ids):
        raise ApiError(f"a token id of {param} is out of the vocabulary: each must be from 0 to "
                       f"{tokenizer.vocab_size - 1}.", param)


def _prompts(prompt, tokenizer) -> tuple[list[str], list[list[int]]]:
    """The prompts' texts and token ids: from a string, a list of strings, a list of token ids or a list of
    such lists, as OpenAI takes them (lm-evaluation-harness sends token ids)."""
    if prompt is None:
        raise ApiError("prompt is required: a string, a list of strings, or token ids.", "prompt")
    prompts = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt
    if not prompts or not all(isinstance(p, str) or _is_ids(p) for p in prompts):
        raise ApiError("prompt must be a string, a non-empty list of strings, a non-empty list of token ids, or a "
                       "list of such lists.", "prompt")
    for p in prompts:
        if not isinstance(p, str):
            _check_vocabulary(p, tokenizer, "prompt")
    ids = [(tokenizer.encode(p) if isinstance(p, str) else list(p)) or [tokenizer.eot_id] for p in prompts]
    return [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts], ids  # an empty prompt starts a document


def parse_completion(body, tokenizer, context: int, slots: int) -> Completion:
    """The request's Completion, or an ApiError that says which field is wrong and why."""
    v = _typed(body)
    prompts, ids = _prompts(v["prompt"], tokenizer)
    try:
        check_sampling(v["max_tokens"], v["temperature"], v["top_k"], v["top_p"])
        stops = check_stops(v["stop"])
    except UserError as e:
        param = next((f for f in ("max_tokens", "temperature", "top_k", "top_p") if str(e).startswith(f)), "stop")
        raise ApiError(str(e), param) from None
    if not 1 <= v["n"] <= slots:
        raise ApiError(f"n must be from 1 to {slots} (the server's slots), got {v['n']}.", "n")
    if v["logprobs"] is not None and not 0 <= v["logprobs"] <= 5:
        raise ApiError(f"logprobs must be from 0 to 5, got {v['logprobs']}.", "logprobs")
    if not 0 <= v["seed"] < 2 ** 32:
        raise ApiError(f"seed must be from 0 to 2**32 - 1, got {v['seed']}.", "seed")
    options = v["stream_options"] or {}
    if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise ApiError('stream_options takes one field, "include_usage", a boolean.', "stream_options")
    for p in ids:
        if len(p) + v["max_tokens"] > context:
            raise ApiError(f"the prompt has {len(p)} tokens and max_tokens is {v['max_tokens']}: together more than "
                           f"the model's context of {context} tokens.", "prompt" if len(p) >= context else "max_tokens",
                           code="context_length_exceeded")
    top_k = min(v["top_k"], 2 ** 31 - 1)  # past the vocabulary is no filter; the controls are int32
    return Completion(prompts, ids, v["max_tokens"], float(v["temperature"]), float(v["top_p"]), top_k, v["seed"],
                      stops, v["n"], v["stream"], bool(options.get("include_usage")), v["logprobs"], v["echo"])


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def envelope(cid: str, model: str, choices: list, usage: dict | None = None) -> dict:
    out = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


# The tokenizer endpoints vLLM serves, which lm-evaluation-harness's `tokenizer_backend=remote` reads: the
# harness then counts and cuts its requests with the served model's own tokenizer, whichever it is.

def tokenizer_info(tokenizer, context: int) -> dict:
    return {"tokenizer_class": "tiktoken", "name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "eos_token": ENDOFTEXT, "bos_token": ENDOFTEXT, "pad_token": None, "chat_template": None,
            "model_max_length": context}


TOKENIZE = {"model": ((str,), None), "prompt": ((str,), None), "add_special_tokens": ((bool,), False)}
DETOKENIZE = {"model": ((str,), None), "tokens": ((list,), None)}


def tokenize(body, tokenizer, context: int) -> dict:
    """POST /tokenize {"prompt": text}: its token ids; the end-of-text token's own text is that token."""
    v = _typed(body, TOKENIZE)
    if v["prompt"] is None:
        raise ApiError("prompt is required: the text to tokenize.", "prompt")
    parts = v["prompt"].split(ENDOFTEXT)
    ids = tokenizer.encode(parts[0])
    for part in parts[1:]:
        ids += [tokenizer.eot_id, *tokenizer.encode(part)]
    return {"tokens": ids, "count": len(ids), "max_model_len": context}


def detokenize(body, tokenizer) -> dict:
    """POST /detokenize {"tokens": ids}: their text, the end-of-text token written as its own text."""
    v = _typed(body, DETOKENIZE)
    if v["tokens"] is None:
        raise ApiError("tokens is required: the token ids to turn into text.", "tokens")
    if not _is_ids(v["tokens"]):
        raise ApiError(f"tokens must be a non-empty list of token ids, got {v['tokens']!r}.", "tokens")
    _check_vocabulary(v["tokens"], tokenizer, "tokens")
    pieces, run = [], []
    for i in [*v["tokens"], tokenizer.eot_id]:
        if i == tokenizer.eot_id:
            pieces.append(tokenizer.decode(run))
            run = []
        else:
            run.append(i)
    return {"prompt": ENDOFTEXT.join(pieces)}
