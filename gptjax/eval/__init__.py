"""Evaluation: how good a checkpoint is on text it never saw and on zero-shot tasks.

  text     a whole text, streamed, in sliding windows: loss, perplexity, bits per byte
  tasks    zero-shot task files: multiple choice (HellaSwag's layout) and last word (LAMBADA's)
  harness  a model for EleutherAI's lm-evaluation-harness (`lm_eval --model gptjax`)

`python -m gptjax.eval RUN_DIR --text=... --task=...` is the command line (__main__). The scoring of
token windows itself is the model's one scorer, gptjax.model.score.
"""
