"""Hugging Face GPT-2 weights without PyTorch: model.safetensors is read and written through
safetensors' NumPy API, so gptjax.load("hf:DIR"), the converter and --train.init_from=hf:DIR work
where torch is not installed; only pytorch_model.bin needs it.

The folders here are written with NumPy in the layout of transformers' save_pretrained (config.json
and model.safetensors, names under 'transformer.', no lm_head: it is tied). The parity of the
logits with transformers itself is tests/weights/test_convert.py, which needs PyTorch.
"""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import ROOT, make_corpus
from gptjax.weights import hf
from gptjax.weights.checkpoint import flatten
from xla_flags import xla_flags

# the full GPT-2 vocabulary (fine-tuning tokenizes with it), everything else tiny
SHAPE = dict(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=50257)


def hf_gpt2_tensors(rng, n_layer, n_embd, n_positions, vocab_size, dtype=np.float32, **_) -> dict:
    D = n_embd
    shapes = {"wte.weight": (vocab_size, D), "wpe.weight": (n_positions, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    block = {"ln_1.weight": (D,), "ln_1.bias": (D,), "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
             "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
             "mlp.c_fc.weight": (D, 4 * D), "mlp.c_fc.bias": (4 * D,), "mlp.c_proj.weight": (4 * D, D),
             "mlp.c_proj.bias": (D,)}
    for i in range(n_layer):
        shapes.update({f"h.{i}.{name}": shape for name, shape in block.items()})
    return {"transformer." + k: rng.normal(0, 0.1, s).astype(dtype) for k, s in shapes.items()}


def write_hf_folder(path, dtype=np.float32, **shape) -> dict:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                  **shape}))
    tensors = hf_gpt2_tensors(np.random.default_rng(0), dtype=dtype, **shape)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_files_are_read_as_float32(tmp_path, dtype):
    tensors = write_hf_folder(tmp_path / "hf", dtype=dtype, **{**SHAPE, "vocab_size": 100})
    _, params = hf.from_hf(tmp_path / "hf")
    kernel = np.asarray(flatten(params)["h/1/mlp/c_fc/kernel"])
    assert kernel.dtype == np.float32
    assert np.array_equal(kernel, tensors["transformer.h.1.mlp.c_fc.weight"].astype(np.float32))


# Run in a fresh interpreter where torch and transformers cannot be imported (tests/without_torch.py).
WITHOUT_TORCH = """
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import gptjax
from gptjax.weights import convert
from gptjax.errors import UserError
from gptjax.options import parse_args
from gptjax.train.trainer import Trainer

hf, tmp = Path(sys.argv[1]), Path(sys.argv[2])
written = load_file(hf / "model.safetensors")

# gptjax.load reads the folder directly
model = gptjax.load(f"hf:{hf}")
assert np.array_equal(np.asarray(model.params["h"][0]["attn"]["c_attn"]["kernel"]),
                      written["transformer.h.0.attn.c_attn.weight"])

# python -m gptjax.weights.convert from-hf, then to-hf: the same tensors, bit for bit
convert.main(["from-hf", str(hf), str(tmp / "run")])
convert.main(["to-hf", str(tmp / "run"), str(tmp / "back")])
back = load_file(tmp / "back" / "model.safetensors")
assert back.keys() == written.keys() and all(np.array_equal(back[k], written[k]) for k in written)

# --train.init_from=hf:DIR: the run starts from the folder's weights (its steps are any run's steps)
trainer = Trainer(parse_args([f"--train.init_from=hf:{hf}", f"--data.corpus={tmp / 'corpus'}",
                              f"--out_dir={tmp / 'tuned'}", "--data.tokenizer=gpt2", "--train.batch_size=4"]))
start = trainer.plan.strategy.host_params(trainer.state)
trainer.close()
assert np.array_equal(np.asarray(start["h"][1]["mlp"]["c_fc"]["kernel"]), written["transformer.h.1.mlp.c_fc.weight"])

# a folder with only pytorch_model.bin: the one case that needs PyTorch, and the message says so
bin_only = tmp / "bin_only"
bin_only.mkdir()
(bin_only / "config.json").write_text((hf / "config.json").read_text())
(bin_only / "pytorch_model.bin").write_bytes(b"not read")
try:
    gptjax.load(f"hf:{bin_only}")
    raise AssertionError("pytorch_model.bin was read without PyTorch")
except UserError as e:
    print(f"message: {e}")
print("all done without torch")
"""


@pytest.mark.slow
def test_hf_weights_without_torch(tmp_path):
    write_hf_folder(tmp_path / "hf", **SHAPE)
    make_corpus(tmp_path / "corpus", n_docs=10)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "without_torch.py"), "-c", WITHOUT_TORCH,
                           str(tmp_path / "hf"), str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                            "XLA_FLAGS": xla_flags(1)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "init: weights from hf:" in proc.stdout and "all done without torch" in proc.stdout
    message = proc.stdout.split("message: ", 1)[1]
    assert "pytorch_model.bin is a PyTorch file, and reading it needs PyTorch, which is not installed" in message
    assert "pip install torch" in message and "model.safetensors is read without PyTorch" in message
