"""A trained model at work: autoregressive decoding, stop strings, gptjax.load, the sampling command."""
