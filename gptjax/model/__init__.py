"""The GPT itself, pure functions of parameters and tokens.

  gpt        the decoder stack (GPT-2 and its modern options) and the one shapes-only build, `abstract`
  attention  full-sequence attention (cuDNN or XLA) and the KV cache's, with their masks
  documents  document boundaries: segments, restarted positions and the same-document mask (--data.doc_mask)
  products   the matrix products in bfloat16 in the plain forms CPU matrix units take, and auto's timing of them
  loss       cross-entropy, chunked over the vocabulary, and per-token log-probabilities
  score      the one scorer: token windows to log-probabilities, for every figure taken from a model
  stacked    the per-layer and the stacked (scanned) layouts of the blocks' parameters
"""
