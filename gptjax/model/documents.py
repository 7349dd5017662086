"""Document boundaries inside a window (--data.doc_mask, --data.doc_positions): which document each token
belongs to, where that document starts, and the attention mask that keeps a token inside its own document.

The end-of-text token closes its document and the next token starts a new one: a token's segment is the
number of end-of-text tokens strictly before it, so the end-of-text token is the last of the document it
closes. A model built with a `Documents` computes this from its input tokens, in training, validation,
scoring and cached decoding alike, so a run is scored the way it was trained.

The cache of a decoding (gptjax.model.gpt) carries it across calls as {"segment": int32 (B, S), the segment
of every cached key; "count": int32 (B,), end-of-text tokens seen so far; "start": int32 (B,), the position
at which the current document started}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptjax.config import DataConfig


@dataclasses.dataclass(frozen=True)
class Documents:
    """How a model treats end-of-text: attention stops there; `restart`: positions restart at 0 with
    each document (learned, sine/cosine and rotary encodings alike)."""

    eot_id: int
    restart: bool = False


def of_run(data: DataConfig, eot_id: int) -> Documents | None:
    """The document rule of a run: its data options and its tokenizer's end-of-text id (Tokenizer.eot_id,
    the same id the shards end every document with); None without --data.doc_mask."""
    if not data.doc_mask:
        return None
    return Documents(eot_id=int(eot_id), restart=data.doc_positions == "restart")


def locate(docs: Documents, idx_BT, positions_BT, count_B, start_B, token_mask_BT=None):
    """Each token's segment and position, continuing a decoding's counts (count_B end-of-text tokens seen,
    the current document started at position start_B; zeros for a fresh window). Returns (segment_BT,
    the positions the model encodes, the count and start after these tokens). Left padding
    (token_mask_BT False) is never an end-of-text."""
    eot_BT = idx_BT == docs.eot_id
    if token_mask_BT is not None:
        eot_BT = eot_BT & token_mask_BT
    eot_i_BT = eot_BT.astype(jnp.int32)
    segment_BT = count_B[:, None] + jnp.cumsum(eot_i_BT, axis=1) - eot_i_BT
    # one past the last end-of-text strictly before each token: where its document starts
    after_BT = jax.lax.cummax(jnp.where(eot_BT, positions_BT + 1, 0), axis=1)
    start_BT = jnp.maximum(start_B[:, None], jnp.pad(after_BT[:, :-1], ((0, 0), (1, 0))))
    encoded_BT = positions_BT - start_BT if docs.restart else positions_BT
    return segment_BT, encoded_BT, count_B + eot_i_BT.sum(axis=1), jnp.maximum(start_B, after_BT[:, -1])


def window(docs: Documents, idx_BT, positions_BT):
    """A fresh window's (segment_BT, positions to encode)."""
    zeros_B = jnp.zeros(idx_BT.shape[:1], jnp.int32)
    segment_BT, encoded_BT, _, _ = locate(docs, idx_BT, positions_BT, zeros_B, zeros_B)
    return segment_BT, encoded_BT


def same_document(segment_BT, segment_BS):
    """(B, T, S): query t and key s are in the same document (the causal part is the attention's own)."""
    return segment_BT[:, :, None] == segment_BS[:, None, :]


def init_cache(batch_size: int, length: int) -> dict:
    return {"segment": jnp.zeros((batch_size, length), jnp.int32), "count": jnp.zeros((batch_size,), jnp.int32),
            "start": jnp.zeros((batch_size,), jnp.int32)}


def extend_cache(docs: Documents, cache: dict, idx_BT, positions_BT, token_mask_BT, index):
    """T new tokens on top of a decoding's document state. Returns (the (B, T, S) same-document mask of
    the new queries against every cached key, the positions to encode, the new document state)."""
    segment_BT, encoded_BT, count_B, start_B = locate(docs, idx_BT, positions_BT, cache["count"], cache["start"],
                                                      token_mask_BT)
    segment_BS = jax.lax.dynamic_update_slice(cache["segment"], segment_BT, (0, index))
    new = {"segment": segment_BS, "count": count_B, "start": start_B}
    return same_document(segment_BT, segment_BS), encoded_BT, new
