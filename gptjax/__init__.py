"""gptjax: pretrain a GPT on your own corpus with JAX, sample from it, open it in a notebook.

The map, in the order a run's data flows (each part imports only from the parts above it):

  config, options, tokenizer, errors, paths   the base: settings, the command line, text <-> ids, messages
  runtime/     the process and its machine: CPU threads, malloc, disks, locks, compute dtype, signals, clocks
  data/        a corpus to token shards and batches: readers, documents, the validation cut, worker processes
  model/       the GPT: the decoder stack, its products' forms, its loss, the one scorer, the stacked layout
  weights/     weights at rest: checkpoints and their faults, the Hugging Face layout, any source, conversion
  inference/   a trained model at work: decoding, stop strings, gptjax.load, the sampling command, the server
  eval/        what a model is worth: loss and bits per byte on a text, zero-shot tasks, lm-eval's model
  train/       a run: its set-up and plan, the step, the optimizer, parallel strategies, many hosts, logs
  bench/       figures, never timed tests: training, sampling, data, quality, memory
  commands     `gptjax COMMAND`: one row per command, each a module's main(argv)
"""

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
