"""Training a model: a run from its set-up to its last checkpoint.

  setup       what a run decides before its first step, as a frozen Plan (resume point, dtype, devices, ...)
  trainer     the loop: steps, reports, stops, the final sample
  evaluation  validation loss, bits per byte and task scores at an evaluation
  saving      a checkpoint with its meta, and the room it needs
  step        the pure training and evaluation steps
  optim       clipping, AdamW (or Muon for the blocks' matrices), warm-up and cosine decay
  parallel    the strategies that place and run the step: pmap, fsdp (a data x model mesh)
  distributed many hosts: start-up, agreement, one writer
  logs        every sink of a run's records: JSONL, TensorBoard, W&B, the silent one
  progress    the progress bar or line, and the token rate
  flops       FLOPs per token and the devices' peak, for MFU
  oom         what an out-of-memory error says would fit
  plot        `gptjax plot`: loss curves of runs
  __main__    `python train.py` / `gptjax train`
"""
