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
from gptjax.inference.generate import generate_ids, output_matrix
from gptjax.model.gpt import GPT, count_params
from gptjax.runtime.timing import compile_seconds, median_time

MODELS = {  # the reference shape of the CPU figures, and GPT-2 small for accelerators
    "reference": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


def bandwidth_meter(megabytes: int = 512):
    """A function () -> memory read bandwidth in bytes/s: the best of a compiled sum and one numpy sum per
    core over the same `megabytes` (allocated once)."""
    n = megabytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    parts = np.array_split(np.ones(n, np.float32), os.cpu_count() or 1) if jax.default_backend() == "cpu" else []

    def threaded():
        threads = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    if parts:
        threaded()  # the threads' first pass, untimed

    def measure() -> float:
        best = x.nbytes / median_time(lambda: total(x).block_until_ready(), 5)
        if parts:
            best = max(best, x.nbytes / median_time(threaded, 5))
        return best

    return measure


def _gptjax_runner(model_cfg: ModelConfig, prompt_tokens: int):
    """A function (batch, n) -> seconds to generate n tokens after each of `batch` random prompts; the params."""
    graphdef, params = nnx.split(GPT(model_cfg, nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    head_DV = output_matrix(graphdef, params)  # made once, as a loaded model keeps it
    rng = np.random.default_rng(0)

    def run(batch: int, n: int) -> float:
        prompts = rng.integers(0, model_cfg.vocab_size, (batch, prompt_tokens)).tolist()
        t0 = time.perf_counter()
        out = generate_ids(graphdef, params, prompts, block_size=model_cfg.block_size, eot_id=-1,
                           max_new_tokens=n, temperature=0, head_DV=head_DV)  # eot -1: every row makes all n
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


def _time_batch(runners: dict, ours: list[str], batch: int, args, rows: dict, meter) -> list[float]:
    """Compile and first-token times, decoding and end-to-end rates at `batch`, into `rows`; the runners
    alternate so that all see the same load, and the memory bandwidth is read after each round (returned)."""
    for name in ours:
        rows[name][f"batch {batch}: compile s"] = compile_seconds(lambda: runners[name](batch, args.new_tokens))
        runners[name](batch, 1)
    for run in runners.values():  # warm up
        run(batch, args.new_tokens)
    first = {name: [] for name in runners}
    total = {name: [] for name in runners}
    bandwidths = []
    for _ in range(args.runs):
        for name, run in runners.items():
            first[name].append(run(batch, 1))
            total[name].append(run(batch, args.new_tokens))
        bandwidths.append(meter())
    for name in runners:
        t_first, t_total = statistics.median(first[name]), statistics.median(total[name])
        rows[name][f"batch {batch}: decode tokens/s"] = batch * (args.new_tokens - 1) / max(t_total - t_first, 1e-9)
        rows[name][f"batch {batch}: end-to-end tokens/s"] = batch * args.new_tokens / t_total
        rows[name][f"batch {batch}: first token ms"] = 1e3 * t_first
    return bandwidths


def _print_table(rows: dict, names: list[str], ours: list[str]) -> None:
    """One row per figure, a column per runner, and with transformers' the ratios."""
    compare = "torch" in names
    print(f"{'':32}" + "".join(f"{n:>18}" for n in names)
          + ("".join(f"{n.replace('gptjax', 'ratio'):>18}" for n in ours) if compare else ""))
    for key in sorted(rows[ours[0]], key=lambda k: (int(k.split()[1].rstrip(":")), k)):
        cells = [rows[n].get(key) for n in names]
        line = f"{key:32}" + "".join(f"{c:18.1f}" if c is not None else f"{'-':>18}" for c in cells)
        if compare and rows["torch"].get(key) is not None:
            theirs = rows["torch"][key]
            line += "".join(f"{rows[n][key] / theirs if 'tokens/s' in key else theirs / rows[n][key]:17.2f}x"
                            for n in ours)
        print(line)
    if compare:
        print("ratio: how many times faster gptjax is than transformers' float32 generate")


def bench_sample(args) -> None:
    shape = MODELS[args.model]
    dtypes = list(dict.fromkeys(args.dtype))
    runners, bytes_per_token = {}, {}
    for dtype in dtypes:
        name = "gptjax" if len(dtypes) == 1 else f"gptjax {dtype}"
        runners[name], params = _gptjax_runner(ModelConfig(**shape, dtype=dtype), args.prompt_tokens)
        n_params = count_params(params)
        bytes_per_token[name] = n_params * jnp.dtype(dtype).itemsize  # decoding reads every weight once a token
    if args.compare == "torch":
        runners["torch"] = TorchRunner(shape, args.prompt_tokens)
    ours = [n for n in runners if n.startswith("gptjax")]
    device = jax.devices()[0]
    print(f"gptjax sample: {shape['n_layer']} layers, {shape['n_head']} heads, width {shape['n_embd']}, "
          f"context {shape['block_size']}, vocabulary {shape['vocab_size']}; {n_params / 1e6:.1f}M parameters, "
          f"compute {' and '.join(dtypes)} (transformers: float32); random weights, greedy, {args.prompt_tokens}-token "
          f"prompts, {args.new_tokens} new tokens, median of {args.runs} runs; {device.platform} "
          f"({device.device_kind}), {os.cpu_count()} CPU cores", flush=True)

    rows: dict[str, dict[str, float]] = {name: {} for name in runners}
    meter, bandwidths = bandwidth_meter(), []
    for batch in args.batch:
        bandwidths += _time_batch(runners, ours, batch, args, rows, meter)
    if "torch" in runners:
        runners["torch"].close()

    bandwidth = statistics.median(bandwidths)
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s (median of {len(bandwidths)}, measured between the "
          "runs: a machine whose speed changes moves the bound with the figures)")
    for name in ours:
        bound = bandwidth / bytes_per_token[name]
        decode = rows[name].get("batch 1: decode tokens/s")
        share = f"; {name} decodes at {decode / bound:.0%} of that" if decode else ""
        print(f"{name}: at most {bound:.0f} tokens/s at batch 1, reading {bytes_per_token[name] / 1e6:.0f} MB of "
              f"weights per token{share}")
    _print_table(rows, list(runners), ours)
