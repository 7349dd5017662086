"""Weights at rest: checkpoints and their faults, the Hugging Face GPT-2 layout, reading any source, conversion."""
