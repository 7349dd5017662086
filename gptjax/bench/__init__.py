"""Benchmarks that print figures (never timed tests): training, sampling, data, quality, memory."""
