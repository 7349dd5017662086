"""`python -m gptjax.bench sample`: decoding speed with random weights.

Decoding tokens/s at each batch size (new tokens after the first, which the prefill makes), time
to first token, compile time, and the bound that memory bandwidth puts on decoding (every weight
is read once per token). With `--compare torch` it times transformers'
GPT2LMHeadModel.generate(use_cache=True) on the same shape, greedy and never stopping early,
alternating with gptjax run by run so that both see the same machine load.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.generate import generate_ids
from gptjax.model import GPT, count_params
from gptjax.timing import compile_seconds, median_time

MODELS = {  # the reference shape of the CPU figures, and GPT-2 small for accelerators
    "reference": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


def read_bandwidth(megabytes: int = 512) -> float:
    """Memory read bandwidth in bytes/s: the best of a compiled sum and one numpy sum per core."""
    n = megabytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = x.nbytes / median_time(lambda: total(x).block_until_ready(), 5)
    if jax.default_backend() == "cpu":
        a = np.ones(n, np.float32)
        parts = np.array_split(a, os.cpu_count() or 1)

        def threaded():
            threads = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        threaded()
        best = max(best, a.nbytes / median_time(threaded, 5))
    return best


def _gptjax_runner(model_cfg: ModelConfig, prompt_tokens: int):
    """A function (batch, n) -> seconds to generate n tokens after each of `batch` random prompts; the params."""
    graphdef, params = nnx.split(GPT(model_cfg, nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)

    def run(batch: int, n: int) -> float:
        prompts = rng.integers(0, model_cfg.vocab_size, (batch, prompt_tokens)).tolist()
        t0 = time.perf_counter()
        out = generate_ids(graphdef, params, prompts, block_size=model_cfg.block_size, eot_id=-1,
                           max_new_tokens=n, temperature=0)  # eot -1: every row makes all n tokens
        seconds = time.perf_counter() - t0
        assert all(len(o) == n for o in out)
        return seconds

    return run, params


def _torch_worker(conn, shape: dict, prompt_tokens: int) -> None:
    """In its own process: time GPT2LMHeadModel.generate for each (batch, n) received, send back seconds."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                                    n_positions=shape["block_size"], vocab_size=shape["vocab_size"])).eval()
    rng = np.random.default_rng(0)
    while (job := conn.recv()) is not None:
        batch, n = job
        ids = torch.tensor(rng.integers(0, shape["vocab_size"], (batch, prompt_tokens)))
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        conn.send(time.perf_counter() - t0)
        assert out.shape == (batch, prompt_tokens + n)


class TorchRunner:
    """transformers in a process of its own: in one process, OpenMP's and XLA's threads wait for work by
    spinning and take the cores from each other (10x slower here). The runs still alternate with gptjax's."""

    def __init__(self, shape: dict, prompt_tokens: int):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_torch_worker, args=(child, shape, prompt_tokens), daemon=True)
        self.process.start()

    def __call__(self, batch: int, n: int) -> float:
        self.conn.send((batch, n))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


def bench_sample(args) -> None:
    shape = MODELS[args.model]
    model_cfg = ModelConfig(**shape, dtype=args.dtype)
    run_gptjax, params = _gptjax_runner(model_cfg, args.prompt_tokens)
    runners = {"gptjax": run_gptjax}
    if args.compare == "torch":
        runners["torch"] = TorchRunner(shape, args.prompt_tokens)
    n_params = count_params(params)
    param_bytes = n_params * jnp.dtype(args.dtype).itemsize
    device = jax.devices()[0]
    print(f"gptjax sample: {model_cfg.n_layer} layers, {model_cfg.n_head} heads, width {model_cfg.n_embd}, "
          f"context {model_cfg.block_size}, vocabulary {model_cfg.vocab_size}; {n_params / 1e6:.1f}M parameters, "
          f"{param_bytes / 1e6:.0f} MB in {args.dtype}; random weights, greedy, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, median of {args.runs} runs; {device.platform} ({device.device_kind}), "
          f"{os.cpu_count()} CPU cores", flush=True)

    rows: dict[str, dict[str, float]] = {name: {} for name in runners}
    for batch in args.batch:
        rows["gptjax"][f"batch {batch}: compile s"] = compile_seconds(lambda: run_gptjax(batch, args.new_tokens))
        run_gptjax(batch, 1)
        for run in runners.values():  # warm up
            run(batch, args.new_tokens)
        first = {name: [] for name in runners}
        total = {name: [] for name in runners}
        for _ in range(args.runs):  # alternate, so that both see the same load
            for name, run in runners.items():
                first[name].append(run(batch, 1))
                total[name].append(run(batch, args.new_tokens))
        for name in runners:
            t_first, t_total = statistics.median(first[name]), statistics.median(total[name])
            rows[name][f"batch {batch}: decode tokens/s"] = batch * (args.new_tokens - 1) / max(t_total - t_first, 1e-9)
            rows[name][f"batch {batch}: end-to-end tokens/s"] = batch * args.new_tokens / t_total
            rows[name][f"batch {batch}: first token ms"] = 1e3 * t_first
    if "torch" in runners:
        runners["torch"].close()

    bandwidth = read_bandwidth()
    bound = bandwidth / param_bytes
    decode = rows["gptjax"].get("batch 1: decode tokens/s")
    share = f"; gptjax decodes at {decode / bound:.0%} of that" if decode else ""
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s: at most {bound:.0f} tokens/s at batch 1, reading "
          f"{param_bytes / 1e6:.0f} MB of weights per token{share}")
    names = list(runners)
    print(f"{'':32}" + "".join(f"{n:>10}" for n in names) + ("     ratio" if len(names) > 1 else ""))
    for key in sorted(rows["gptjax"], key=lambda k: (int(k.split()[1].rstrip(":")), k)):
        cells = [rows[n].get(key) for n in names]
        line = f"{key:32}" + "".join(f"{c:10.1f}" if c is not None else f"{'-':>10}" for c in cells)
        if len(names) > 1 and None not in cells:
            line += f"{cells[0] / cells[1] if 'tokens/s' in key else cells[1] / cells[0]:9.2f}x"
        print(line)
    if len(names) > 1:
        print("ratio: how many times faster gptjax is")
