"""The blocks' parameters per layer or stacked on a leading layer axis (--model.scan_layers), and the
one conversion between the two.

Per layer, the params hold `h` as {0: block, 1: block, …} ('h/0/attn/c_attn/kernel', GPT-2's names);
stacked, `h` is one block whose every leaf has a leading axis of n_layer ('h/attn/c_attn/kernel',
shape (L, D, 3D)). The same tensors either way, so a checkpoint of one layout restores in the other,
and Hugging Face's per-layer names are written from either. Optimizer states hold params-shaped
trees (AdamW's moments), so `relayout` converts them too.
"""

from __future__ import annotations

import jax
import numpy as np


def _is_per_layer(h) -> bool:
    return isinstance(h, dict) and bool(h) and all(isinstance(k, int) for k in h)


def _holds_blocks(node) -> bool:
    return isinstance(node, dict) and "h" in node


def is_stacked(params) -> bool:
    return not _is_per_layer(params["h"])


def _stack(*layers):
    if isinstance(layers[0], jax.ShapeDtypeStruct):  # a template: shapes only, nothing allocated
        return jax.ShapeDtypeStruct((len(layers), *layers[0].shape), layers[0].dtype)
    return (np if isinstance(layers[0], np.ndarray) else jax.numpy).stack(layers)


def _layer(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[i]


def relayout(tree, stacked: bool):
    """`tree` (params, an optimizer state, arrays or shape/dtype structs) with every `h` it holds
    stacked (True) or per layer (False); a tree already so is returned as it is."""
    blocks = [n["h"] for n in jax.tree.leaves(tree, is_leaf=_holds_blocks) if _holds_blocks(n)]
    # the layer count; an `h` may hold no arrays at all (a masked-out part of an optimizer state)
    n = next((jax.tree.leaves(h)[0].shape[0] for h in blocks if not _is_per_layer(h) and jax.tree.leaves(h)), 0)

    def convert(node):
        if not _holds_blocks(node):
            return node
        h = node["h"]
        if _is_per_layer(h) and stacked:
            h = jax.tree.map(_stack, *[h[i] for i in sorted(h)])
        elif not _is_per_layer(h) and not stacked:
            h = {i: jax.tree.map(lambda x: _layer(x, i), h) for i in range(n)}  # noqa: B023
        return {**node, "h": h}

    return jax.tree.map(convert, tree, is_leaf=_holds_blocks)


def per_layer_ndim(path, p) -> int:
    """A parameter's own number of dimensions, without the layer axis of a stacked block
    (what weight decay and Muon ask: is it a matrix?). `path` is its tree path in the params."""
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    stacked_block = len(keys) > 1 and keys[0] == "h" and not isinstance(keys[1], int)
    return p.ndim - 1 if stacked_block else p.ndim
