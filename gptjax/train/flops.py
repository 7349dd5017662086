"""The FLOPs a training step costs and the devices' peak rate, the two figures MFU (model FLOP
utilisation) divides: the trainer logs it, the training bench reports it."""

from __future__ import annotations

from gptjax.config import ModelConfig

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets, by substrings of jax's device_kind.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6": 918e12}


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6 per weight (forward and backward) plus attention's scores and mixing.
    A lookup costs nothing: the position table, and the token embedding when the output layer is another."""
    lookups = cfg.block_size * (cfg.pos_encoding == "learned") + cfg.padded_vocab_size * (not cfg.tie_embeddings)
    n_matmul = n_params - lookups * cfg.n_embd
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def peak_flops(device) -> float | None:
    """A device's dense bf16 peak FLOP/s from PEAK_FLOPS, or None for a kind it does not list."""
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None
