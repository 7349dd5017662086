"""`python -m gptjax.bench serve`: the completions server under load, against decoding without it.

A random model of a bench shape (gptjax.bench.sample.MODELS) is served in this process on 127.0.0.1;
for each number of concurrent clients, that many clients stream the same set of requests (greedy,
fixed prompt and completion lengths) and the table gives the tokens per second of the whole set, the
time to the first token (TTFT) and the time per token after it (TPOT, a request's time from its first
token to its last over its tokens but one), p50 and p99 over the requests. One client is the requests
one after another. Each load is followed at once by `generate` without the server at as many prompts
as the load keeps busy (min(clients, slots), as `python -m gptjax.bench sample --batch N` times it),
so that a machine whose speed drifts is compared with itself: the ratio is the server's throughput
against generate's, and for one client generate's time per token against the server's TPOT.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import threading
import time
from pathlib import Path

import numpy as np
from flax import nnx

from gptjax.bench.sample import MODELS
from gptjax.config import Config, DataConfig, ModelConfig
from gptjax.inference.pretrained import Pretrained
from gptjax.inference.serve.__main__ import build
from gptjax.model.gpt import GPT


def _served(model, slots: int, steps: int):
    import uvicorn

    app, batcher = build(model, "bench", slots, None, steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, batcher


async def _one(http, url: str, body: dict) -> tuple[float, float, int]:
    """One streamed request: the time to its first token, the time per token after it, and its tokens (from the
    usage chunk: a chunk may carry several tokens)."""
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                last = time.perf_counter()
                first = first or last
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first - t0, (last - first) / max(tokens - 1, 1), tokens


async def _load(url: str, bodies: list[dict], clients: int):
    import httpx

    todo = list(bodies)
    results = []
    async with httpx.AsyncClient(timeout=600) as http:
        async def client():
            while todo:
                results.append(await _one(http, url, todo.pop()))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - t0, results


def _clients(conn, url: str, body: dict, requests: int, counts: list[int]) -> None:
    """The load, run in its own process: for each count of concurrent clients, when told to go, the seconds and
    the results."""
    for clients in counts:
        conn.recv()
        conn.send(asyncio.run(_load(url, [dict(body) for _ in range(requests)], clients)))
    conn.close()


def _generate(model, prompt: str, batch: int, new_tokens: int) -> tuple[float, float]:
    """generate without the server at `batch` prompts: (tokens/s, ms per token), the better of 2 after a compile."""
    prompts = [prompt] * batch
    run = lambda: model.generate(prompts, max_new_tokens=new_tokens, temperature=0, batch_size=batch)  # noqa: E731
    run()
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return batch * new_tokens / best, best / new_tokens * 1e3


def bench_serve(args) -> None:
    cfg = ModelConfig(**MODELS[args.model], dtype="float32")
    graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(0)), nnx.Param)
    model = Pretrained(Config(model=cfg, data=DataConfig(tokenizer="gpt2")), graphdef, nnx.to_pure_dict(params), 0,
                       Path("."))
    prompt = " hello" * args.prompt_tokens  # one GPT-2 token each
    body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0, "stream": True, "stop": "\u0000never",
            "stream_options": {"include_usage": True}}
    url, server, batcher = _served(model, args.slots, args.scheduler_steps)
    print(f"{args.model} shape, {args.requests} requests of {args.prompt_tokens} prompt and {args.new_tokens} new "
          f"tokens, {args.slots} slots, {args.scheduler_steps} scheduler steps; generate at min(clients, slots) "
          "prompts, timed after each load")
    print(f"{'clients':>8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
          f"{'generate':>9} {'ms/token':>9} {'ratio':>6}  (ms; ratio: tokens/s, or TPOT for 1 client)")
    # the clients in a process of their own, as a server's clients are: their parsing holds no lock of the server's
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    clients_process = spawn.Process(target=_clients, args=(theirs, url, body, args.requests, args.clients))
    clients_process.start()
    try:
        for clients in args.clients:
            ours.send("go")
            seconds, results = ours.recv()
            rate = sum(r[2] for r in results) / seconds
            ttft = np.percentile([r[0] * 1e3 for r in results], [50, 99])
            tpot = np.percentile([r[1] * 1e3 for r in results], [50, 99])
            g_rate, g_ms = _generate(model, prompt, min(clients, args.slots), args.new_tokens)  # the same minute
            ratio = g_ms / tpot[0] if clients == 1 else rate / g_rate
            print(f"{clients:>8} {rate:9.0f} {ttft[0]:9.1f} {ttft[1]:9.1f} {tpot[0]:9.2f} {tpot[1]:9.2f} "
                  f"{g_rate:9.0f} {g_ms:9.2f} {ratio:6.0%}", flush=True)
    finally:
        clients_process.join(timeout=5)
        clients_process.kill()
        server.should_exit = True
        batcher.close()
