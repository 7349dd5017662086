"""gptjax: pretrain a GPT on your own corpus with JAX, sample from it, open it in a notebook."""

from gptjax.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig
from gptjax.pretrained import Pretrained, load

__all__ = ["Config", "DataConfig", "ModelConfig", "SampleConfig", "TrainConfig", "Pretrained", "load"]
__version__ = "0.1.0"
