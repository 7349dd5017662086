"""`python -m gptjax.bench serve`: the completions server under load, against decoding without it.

A random model of a bench shape (gptjax.bench.sample.MODELS) is served in this process on 127.0.0.1;
for each number of concurrent clients, that many clients stream the same set of requests (greedy,
fixed prompt and completion lengths) and the table gives the tokens per second of the whole set, the
time to the first token and the time between tokens (p50 and p99 over every request). One client is
the requests one after another. The last lines are `generate` without the server, at batch 1 and at
--slots prompts together, as `python -m gptjax.bench sample --batch 1 16` times it, and the two ratios
that say what the server adds: the throughput of --slots clients against generate's at that batch, and
one client's time per token (p50) against generate's at batch 1.
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


def _served(model, slots: int):
    import uvicorn

    app, batcher = build(model, "bench", slots, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, batcher


async def _one(http, url: str, body: dict) -> tuple[float, list[float]]:
    """One streamed request: the time to its first token and the times between its tokens."""
    t0 = time.perf_counter()
    stamps = []
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                stamps.append(time.perf_counter())
    return stamps[0] - t0, np.diff(stamps).tolist()


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
    """The load, run in its own process: for each count of concurrent clients, the seconds and the results."""
    for clients in counts:
        conn.send(asyncio.run(_load(url, [dict(body) for _ in range(requests)], clients)))
    conn.close()


def _row(name: str, seconds: float, tokens: int, results) -> str:
    ttft = [r[0] * 1e3 for r in results]
    gaps = [g * 1e3 for r in results for g in r[1]] or [0.0]
    return (f"{name:>12} {tokens / seconds:10.0f} {np.percentile(ttft, 50):9.1f} {np.percentile(ttft, 99):9.1f} "
            f"{np.percentile(gaps, 50):9.2f} {np.percentile(gaps, 99):9.2f}")


def bench_serve(args) -> None:
    cfg = ModelConfig(**MODELS[args.model], dtype="float32")
    graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(0)), nnx.Param)
    model = Pretrained(Config(model=cfg, data=DataConfig(tokenizer="gpt2")), graphdef, nnx.to_pure_dict(params), 0,
                       Path("."))
    prompt = " hello" * args.prompt_tokens  # one GPT-2 token each
    body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0, "stream": True, "stop": "\u0000never"}
    url, server, batcher = _served(model, args.slots)
    print(f"{args.model} shape, {args.requests} requests of {args.prompt_tokens} prompt and {args.new_tokens} new "
          f"tokens, {args.slots} slots")
    print(f"{'clients':>12} {'tokens/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'gap p50':>9} {'gap p99':>9}  (ms)")
    figures = {}  # clients: (tokens/s, the time between tokens at p50 in ms)
    # the clients in a process of their own, as a server's clients are: their parsing holds no lock of the server's
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    clients_process = spawn.Process(target=_clients, args=(theirs, url, body, args.requests, args.clients))
    clients_process.start()
    try:
        for clients in args.clients:
            seconds, results = ours.recv()
            tokens = sum(len(r[1]) + 1 for r in results)
            print(_row(str(clients), seconds, tokens, results), flush=True)
            figures[clients] = tokens / seconds, float(np.percentile([g * 1e3 for r in results for g in r[1]], 50))
    finally:
        clients_process.join(timeout=5)
        clients_process.kill()
        server.should_exit = True
        batcher.close()
    rows = {}  # batch: (tokens/s, ms per token) of generate without a server, the best of 3
    for batch in dict.fromkeys((1, args.slots)):
        prompts = [prompt] * batch
        model.generate(prompts, max_new_tokens=args.new_tokens, temperature=0, batch_size=batch)  # compiled, untimed
        best = min(_timed(lambda: model.generate(prompts, max_new_tokens=args.new_tokens, temperature=0,
                                                 batch_size=batch)) for _ in range(3))
        rows[batch] = batch * args.new_tokens / best, best / args.new_tokens * 1e3
        print(f"{'generate':>12} {rows[batch][0]:10.0f} {'':>9} {'':>9} {rows[batch][1]:9.2f} {'':>9}  (batch {batch}, "
              "no server)")
    if args.slots in figures:
        print(f"{args.slots} clients: {figures[args.slots][0] / rows[args.slots][0]:.0%} of generate's batch-{args.slots} "
              "throughput")
    if 1 in figures:
        print(f"1 client: time per token {figures[1][1] / rows[1][1]:.2f}x generate's at batch 1")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
