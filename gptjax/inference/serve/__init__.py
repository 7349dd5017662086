"""`gptjax serve`: an OpenAI-compatible completions server over continuous batching.

  batcher   the KV-cache slots and the one thread that decodes them
  api       the request fields, checked, and OpenAI's response and error shapes
  app       the ASGI app (Starlette): routes, streaming, the API key
  __main__  the command
"""

SCHEDULER_STEPS = 8  # tokens each row decodes per compiled call, by default (gptjax serve --scheduler_steps)
