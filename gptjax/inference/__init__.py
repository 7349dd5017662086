"""A trained model at work.

  generate    prompt prefill and decoding from a KV cache, compiled per length bucket
  stops       stop strings, found across token boundaries
  pretrained  `gptjax.load`: the notebook object (generate, stream, logprobs, perplexity, bits per byte)
  sample      `python sample.py` / `gptjax sample`
  serve/      `gptjax serve`: an OpenAI-compatible completions server over continuous batching
"""
