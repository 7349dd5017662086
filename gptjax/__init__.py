"""gptjax: pretrain a GPT on your own corpus with JAX, sample from it, open it in a notebook."""

from gptjax.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig

__all__ = ["Config", "DataConfig", "ModelConfig", "SampleConfig", "TrainConfig", "Pretrained", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # JAX is imported on first use of load/Pretrained, so that tools which need no JAX (data
    # preparation and its worker processes) start quickly and stay small
    if name in ("Pretrained", "load"):
        from gptjax.inference import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
