"""Small models that tests in several folders build: an untrained byte-level Pretrained, a random
Hugging Face GPT-2 folder (torch and transformers are imported only when one is made)."""

from pathlib import Path

from flax import nnx

from gptjax.config import Config, DataConfig, ModelConfig
from gptjax.inference.pretrained import Pretrained
from gptjax.model import documents
from gptjax.model.gpt import GPT

T = 32


def byte_model(pos="learned", doc_positions=None) -> Pretrained:
    """An untrained character-level model: its samples are often not UTF-8, which streaming must survive.
    With `doc_positions` ("continue" or "restart"), a model of --data.doc_mask=true."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=257, pos_encoding=pos, dtype="float32")
    data = DataConfig(tokenizer="byte", doc_mask=doc_positions is not None, doc_positions=doc_positions or "continue")
    graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(1), docs=documents.of_run(data, 256)), nnx.Param)
    return Pretrained(Config(model=cfg, data=data), graphdef, nnx.to_pure_dict(params), 0, Path("."))



def make_hf(path, seed=0, **shape):
    """A random GPT2LMHeadModel saved to `path`. Every tensor is perturbed (biases, LayerNorm scales too),
    so a swapped or misnamed tensor changes the logits."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model
