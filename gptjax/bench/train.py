"""`python -m gptjax.bench train`: how fast the training step runs, and against what limit.

The step is the trainer's own (the same strategy, donation and one compilation), on random
tokens prepared on the host and put on the devices one step ahead. Each timed round dispatches
`--steps` steps and waits once at the end, as training does (metrics are read a step late, so the
host never waits inside a round). Figures are medians over rounds: ms/step, tokens/s, achieved
TFLOP/s (flops.flops_per_token), MFU against the device's peak (flops.PEAK_FLOPS, or
--peak-tflops), peak memory and compile time. On a CPU there is no data-sheet peak: a large
float32 matrix product is timed in every round and its rate is the peak, which tracks the load
that other programs put on the machine.

`--compare torch` runs transformers' GPT2LMHeadModel of the same shape with torch.optim.AdamW on
the same batch size, in a process of its own (OpenMP's and XLA's spinning threads take the cores
from each other in one process), round for round alternating with gptjax, and prints the ratio.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.runtime import cpu
from gptjax.runtime.timing import compile_seconds
from gptjax.config import Config
from gptjax.options import parse_args
from gptjax.train.flops import flops_per_token, peak_flops
from gptjax.model.attention import attention_implementation
from gptjax.model.gpt import compute_dtype, count_params
from gptjax.train.optim import make_optimizer
from gptjax.train.parallel import STRATEGIES, select_devices
from gptjax.model import products
from gptjax.runtime.precision import matmul_rate
from gptjax.train.oom import is_out_of_memory
from gptjax.train.setup import init_model

REFERENCE = ["--model.n_layer=6", "--model.n_head=6", "--model.n_embd=384", "--model.block_size=256",
             "--model.vocab_size=50304", "--train.batch_size=8"]
PEAK_SIZE = 3072  # the CPU peak's matrix product: 58 GFLOP, large enough for every core to stream


class GptjaxRunner:
    """The trainer's step on random tokens: call with a number of steps, get the seconds they took."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t, m = cfg.train, cfg.model
        self.graphdef, params = init_model(cfg)
        self.n_params = count_params(params)
        tx = make_optimizer(t)
        self.devices = select_devices(t.devices)
        self.strategy = STRATEGIES[t.parallel](self.graphdef, tx, m.dropout, self.devices, False,
                                                loss_chunk=t.loss_chunk, remat=t.remat)
        self.state = self.strategy.put_state({"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)})
        self.rng = np.random.default_rng(0)
        self.shape = (t.grad_accum, t.batch_size, m.block_size + 1)
        self.key = jax.random.key(t.seed)
        self.last = None

    def _batch(self):
        tokens = self.rng.integers(0, self.cfg.model.vocab_size, self.shape, dtype=np.int32)
        return tokens[..., :-1], tokens[..., 1:]

    def __call__(self, steps: int) -> float:
        batch = self._batch()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.strategy.train_step(self.state, *batch, self.key)
            batch = self._batch()  # the next batch is made while this step runs
            if self.last is not None:
                float(self.strategy.first(self.last)["loss"])  # the previous step's, one step late
            self.last = metrics
        jax.block_until_ready(self.state)
        return time.perf_counter() - t0

    def loss(self) -> float:
        return float(self.strategy.first(self.last)["loss"])


def _torch_worker(conn, cfg: Config, bf16: bool) -> None:
    """In its own process: GPT2LMHeadModel + AdamW (in bfloat16 autocast for a bfloat16 comparison, as
    PyTorch users train in 16 bits); for each step count received, send back the seconds."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, n_positions=m.block_size,
                                       vocab_size=m.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    rng = np.random.default_rng(0)
    while (steps := conn.recv()) is not None:
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = torch.from_numpy(rng.integers(0, m.vocab_size, (t.batch_size * t.grad_accum, m.block_size + 1)))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        conn.send(time.perf_counter() - t0)


class TorchRunner:
    def __init__(self, cfg: Config):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        bf16 = compute_dtype(cfg.model) == jnp.bfloat16
        self.process = ctx.Process(target=_torch_worker, args=(child, cfg, bf16), daemon=True)
        self.process.start()

    def __call__(self, steps: int) -> float:
        self.conn.send(steps)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=60)


def peak_memory(device) -> tuple[float, str]:
    """Bytes at the device's high-water mark, or the process's peak resident memory on a CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device peak memory"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def configure(rest: list[str]) -> Config:
    argv = rest if any(a.startswith("--config") for a in rest) else REFERENCE + rest
    cfg = parse_args(argv, prog="python -m gptjax.bench train")
    if not cfg.model.vocab_size:
        from gptjax.train.setup import resolve

        cfg = resolve(cfg)
    return cfg


def bench_train(args, rest: list[str]) -> None:
    cfg = configure(rest)
    m, t = cfg.model, cfg.train
    products.decision(m, t.batch_size * m.block_size)  # before the model is traced: auto times its products
    ours = GptjaxRunner(cfg)
    device = ours.devices[0]
    n_dev = len(ours.devices)
    tokens = t.grad_accum * t.batch_size * m.block_size
    flops_step = flops_per_token(m, ours.n_params) * tokens
    on_cpu = device.platform == "cpu"
    table_peak = peak_flops(device)
    compute = compute_dtype(m)
    head = jax.ShapeDtypeStruct((1, 1, m.n_head, m.n_embd // m.n_head), compute)
    print(f"gptjax train: {m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, context {m.block_size}, vocabulary "
          f"{m.vocab_size} (padded {m.padded_vocab_size}); {ours.n_params / 1e6:.1f}M parameters, {compute.name} "
          f"compute{' (' + products.explain_dtype(m).why + ')' if m.dtype == 'auto' else ''}"
          f"{' (transformers: bfloat16 autocast)' if args.compare and compute == jnp.bfloat16 else ''}; "
          f"batch {t.grad_accum} x {t.batch_size} = {tokens:,} tokens/step, {flops_step / 1e9:.0f} GFLOP/step; "
          f"{n_dev} x {device.platform} ({device.device_kind}), {t.parallel}, {os.cpu_count()} CPU cores; "
          f"attention {attention_implementation(head) or 'xla'}; loss chunk {t.loss_chunk or 'off'}; remat {t.remat}"
          f"{''.join('; ' + a for a in cpu.applied)}", flush=True)

    compile_s = compile_seconds(lambda: ours(1))
    traces_after_compile = ours.strategy.traces
    ours(args.warmup)
    runners = {"gptjax": ours}
    if args.compare == "torch":
        runners["torch"] = TorchRunner(cfg)
        runners["torch"](max(args.warmup, 1))
    seconds, peaks = timed_rounds(runners, args, compute if on_cpu and args.peak_tflops is None else None)
    if args.peak_tflops is not None:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    elif on_cpu:
        peak, source = statistics.median(peaks), f"measured: {compute.name} {PEAK_SIZE}x{PEAK_SIZE} matmul, median of rounds"
    else:
        peak, source = table_peak, "data sheet, dense bf16"
    mem, mem_name = peak_memory(device)
    print(f"peak per device: {f'{peak / 1e12:.3f} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'} ({source}); "
          f"loss {ours.loss():.3f}; compile {compile_s:.1f} s; step compilations {ours.strategy.traces} "
          f"({traces_after_compile} at the first step); {mem_name} {mem / 2**30:.2f} GiB")
    print_table(seconds, tokens, flops_step, peak * n_dev if peak else None)
    if args.max_batch:
        print(f"largest batch that fits: {largest_batch(cfg)}")


def timed_rounds(runners: dict, args, peak_dtype) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per step of each runner in every round, the runners alternating so that each sees the same
    load; with `peak_dtype`, the peak product rate measured in every round too (a CPU's peak)."""
    seconds = {name: [] for name in runners}
    peaks = []
    for _ in range(args.rounds):
        if peak_dtype is not None:
            peaks.append(matmul_rate(peak_dtype, PEAK_SIZE, repeats=3))
        for name, run in runners.items():
            seconds[name].append(run(args.steps) / args.steps)
    if "torch" in runners:
        runners["torch"].close()
    return seconds, peaks


def print_table(seconds: dict[str, list[float]], tokens: int, flops_step: float, peak: float | None) -> None:
    """Medians per runner (ms/step, tokens/s, TFLOP/s, MFU against `peak` over all devices) and, with two
    runners, how many times faster gptjax is."""
    names = list(seconds)
    rows = {}
    for name in names:
        s = statistics.median(seconds[name])
        achieved = flops_step / s
        rows[name] = {"ms/step": 1e3 * s, "tokens/s": tokens / s, "TFLOP/s": achieved / 1e12,
                      "MFU %": 100 * achieved / peak if peak else None}
    print(f"{'':12}" + "".join(f"{n:>12}" for n in names) + ("       ratio" if len(names) > 1 else ""))
    for key in rows["gptjax"]:
        cells = [rows[n][key] for n in names]
        line = f"{key:12}" + "".join(f"{c:12.3f}" if c is not None else f"{'-':>12}" for c in cells)
        if len(names) > 1 and None not in cells:
            line += f"{cells[1] / cells[0] if key == 'ms/step' else cells[0] / cells[1]:11.2f}x"
        print(line)
    if len(names) > 1:
        print("ratio: how many times faster gptjax is; per-round ms/step: "
              + "; ".join(f"{n} " + " ".join(f"{1e3 * s:.0f}" for s in seconds[n]) for n in names))


def largest_batch(cfg: Config) -> int:
    """Double the batch size until a step runs out of memory; the last one that ran."""
    fits, size = 0, cfg.train.batch_size
    while size <= 1 << 16:
        try:
            runner = GptjaxRunner(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=size)))
            runner(1)
        except Exception as e:  # noqa: BLE001  only an out-of-memory error ends the search quietly
            if not is_out_of_memory(e):
                raise
            break
        fits, size = size, size * 2
        del runner
    return fits
