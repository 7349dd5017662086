"""Benchmarks that print figures, never timed tests: `python -m gptjax.bench train|sample|data|quality`.

  train    the training step's time, tokens per second and MFU (against PyTorch with --compare torch)
  sample   decoding speed against the memory bandwidth (and transformers)
  data     preparation rates, processes against threads
  quality  what each option reaches in a fixed time
  memory   `gptjax memory`: per-device memory of the compiled step, pmap against fsdp
"""
