"""Weights at rest.

  checkpoint  orbax checkpoints of a run: save, retain, find, read
  faults      what a failed read means: corrupt, incomplete, mismatched, vanished, or the call itself
  hf          the Hugging Face GPT-2 layout (safetensors, pytorch_model.bin) to gptjax's names and back
  sources     any source of weights, a run directory or hf:DIR, read into one shape
  convert     `gptjax convert from-hf|to-hf`
"""
