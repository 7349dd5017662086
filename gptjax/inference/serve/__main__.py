"""`gptjax serve RUN_DIR|hf:DIR [--host=127.0.0.1] [--port=8000] [--slots=16] [--scheduler_steps=8]
[--api_key=KEY]`: the model behind an OpenAI-compatible completions API, on this machine only unless
--host says otherwise.

The model is loaded and every compilation done before the port opens. SIGTERM or Ctrl-C stops
accepting requests, lets those in flight finish (uvicorn's graceful shutdown), then stops the decoder.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal

from gptjax.config import opt
from gptjax.errors import UserError, cli
from gptjax.inference.serve import SCHEDULER_STEPS
from gptjax.options import parse_flat

INTRO = ("Serve a checkpoint over HTTP: POST /v1/completions (OpenAI's fields, streaming as server-sent events), "
         "GET /v1/models, GET /health. The checkpoint is the first argument: a run directory, a checkpoint step "
         "directory or hf:DIR. The API key may also come from GPTJAX_API_KEY.")


@dataclass(frozen=True)
class ServeConfig:
    checkpoint: str = opt("", "what to serve: a run directory, a checkpoint step directory or hf:DIR; also the first "
                              "argument without --checkpoint=")
    step: int = opt(-1, "which checkpoint step to load; -1 for the latest")
    dtype: Literal["checkpoint", "float32", "bfloat16", "auto"] = opt("checkpoint", "the compute dtype")
    host: str = opt("127.0.0.1", "the address to listen on; 0.0.0.0 opens the server to other machines")
    port: int = opt(8000, "the TCP port")
    slots: int = opt(16, "requests decoded together (KV-cache rows); more wait for a free one")
    scheduler_steps: int = opt(SCHEDULER_STEPS, "tokens each row decodes per compiled call: more amortise the "
                                                "call and the streaming over more tokens; 1 streams token by token; "
                                                "a new request waits at most this many steps to join")
    api_key: str = opt("", "require Authorization: Bearer KEY on every request but /health (else GPTJAX_API_KEY)")

    def __post_init__(self):
        if not self.checkpoint:
            raise UserError("give the checkpoint to serve first: gptjax serve out/run (a run directory, a checkpoint "
                            "step directory or hf:DIR).")
        if self.slots < 1:
            raise UserError(f"--slots must be at least 1, got {self.slots}.")
        if not 1 <= self.scheduler_steps <= 64:
            raise UserError(f"--scheduler_steps must be from 1 to 64, got {self.scheduler_steps}.")
        if not 0 <= self.port < 65536:
            raise UserError(f"--port must be from 0 to 65535, got {self.port}.")


def parse(argv: list[str]) -> ServeConfig:
    if argv and not argv[0].startswith("-"):  # the checkpoint, as the first argument
        argv = [f"--checkpoint={argv[0]}", *argv[1:]]
    return parse_flat(ServeConfig, argv, prog="gptjax serve", intro=INTRO)


def build(model, name: str, slots: int, api_key: str | None, steps: int = SCHEDULER_STEPS):
    """The app and its started Batcher, compiled."""
    from gptjax.inference.serve.app import make_app
    from gptjax.inference.serve.batcher import Batcher

    batcher = Batcher(model, slots, steps)
    batcher.warm()
    batcher.start()
    return make_app(model, batcher, name, api_key), batcher


@cli
def main(argv: list[str]) -> None:
    cfg = parse(argv)
    import uvicorn  # after the options: --help and bad input answer without JAX

    from gptjax.inference.pretrained import load

    model = load(cfg.checkpoint, None if cfg.step < 0 else cfg.step, None if cfg.dtype == "checkpoint" else cfg.dtype)
    name = os.path.basename(str(cfg.checkpoint).rstrip("/")) or str(cfg.checkpoint)
    app, batcher = build(model, name, cfg.slots, cfg.api_key or os.environ.get("GPTJAX_API_KEY") or None,
                         cfg.scheduler_steps)
    print(f"serving {model!r} at http://{cfg.host}:{cfg.port}/v1 ({cfg.slots} slots)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=30)
    finally:
        batcher.close()


if __name__ == "__main__":
    main(sys.argv[1:])
