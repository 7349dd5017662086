"""`python -m gptjax.bench quality`: how good a model each option gives in a fixed wall-clock budget.

Each arm is a set of train.py options on top of a baseline, GPT-2's architecture with AdamW and
GPT-2's tokenizer at the CPU shape (the cpu-gpt2 preset, what `python train.py` ran before the
modern options), or options of its own on top of a preset.
Every arm's training step is timed first, before any arm trains (the trainer's own step on random
tokens, as `bench train` does, each arm in a process of its own, in rounds that alternate between
the arms, so that a machine whose speed drifts slows them alike); then for each arm the number of steps that fits the budget is set
(warm-up 8% of them, cosine decay to the end) and train.py runs it on the default corpus. Only the
timing needs a quiet machine: the training that follows is the same number of steps however long it
takes. `--steps N` trains every arm N steps instead, which compares options that do not change the
step's cost (learning rates, schedules) exactly. Then every arm is scored on the same text: the
validation documents of the default corpus (the same documents for every tokenizer, since the split
is by document), each scored from its start (after end-of-text), in windows of the model's context,
as bits per UTF-8 byte. Tokenizer-independent, so a learned tokenizer, GPT-2's and bytes compare.

The data arms: `doc_mask` and `align` (windows from documents' starts, with the mask) train on the
same shards; `mix` trains on a mixture of the default corpus's shards and numpy's Python source, and is
scored, as every arm, on the default corpus's validation documents alone.

With --half, the last arm also runs in half the budget, which answers whether it reaches the
baseline's bits per byte in half the time. Results go to --out/quality.json as well as the screen.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The baseline: the CPU default as it was (GPT-2 architecture, tokenizer and AdamW), the cpu-gpt2 preset.
BASELINE = ["--config=cpu-gpt2"]
ARMS = {
    "gpt2": [],
    "rope": ["--model.pos_encoding=rope"],
    "rmsnorm": ["--model.norm=rmsnorm"],
    "qk_norm": ["--model.qk_norm=true"],
    "relu2": ["--model.mlp=relu2"],
    "swiglu": ["--model.mlp=swiglu"],
    "untied": ["--model.tie_embeddings=false"],
    "no_bias": ["--model.bias=false"],
    "gqa": ["--model.n_kv_head=2"],
    "muon": ["--train.optimizer=muon"],
    "bpe8k": ["--data.tokenizer=bpe", "--data.bpe_vocab=8192"],
    "doc_mask": ["--data.doc_mask=true"],
    "align": ["--data.align=bos", "--data.doc_mask=true"],
    # the default corpus (its shards, {shards}) with a fifth of each batch from numpy's Python source, which
    # every install holds ({numpy}): whether mixing in other code helps or hurts the default corpus's figure
    "mix": ["--data.mix=stdlib={shards}:0.8,numpy={numpy}:0.2"],
    # another seed of the same arm (mix+seed1): the spread between seeds, against which the others are read
    "seed1": ["--train.seed=1"],
}


def arm_options(spec: str) -> list[str]:
    """All train.py options of an arm: NAME (from ARMS) or NAME+NAME+... on top of the baseline, or a
    name and options of its own after a colon, on top of the CPU preset ('old:--config=cpu-gpt2')."""
    if ":" in spec:
        raw = spec.partition(":")[2].split()
        return raw if any(o.startswith("--config") for o in raw) else ["--config=cpu", *raw]
    options = list(BASELINE)
    for part in spec.split("+"):
        if part not in ARMS:
            raise SystemExit(f"error: unknown arm {part!r}; known: {', '.join(ARMS)}, or NAME:--options ...")
        options += ARMS[part]
    return options


def _arm_worker(conn, options: list[str]) -> None:
    """One arm's training step in a process of its own (as train.py will run it): compile, settle, then
    time as many steps as asked, until told to stop."""
    from gptjax.bench.train import GptjaxRunner, configure

    runner = GptjaxRunner(configure(options))
    runner(2)  # compile and settle
    conn.send("ready")
    while (steps := conn.recv()) is not None:
        conn.send(runner(steps) / steps)


def step_seconds(arms: list[tuple[str, list[str]]], rounds: int = 3) -> dict[str, float]:
    """The median seconds of each arm's training step, timed as `bench train` times it, each arm in a
    process of its own (as train.py runs it, with no other model in memory), in rounds that alternate
    between the arms."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    workers = {}
    for name, options in arms:
        if name not in workers:
            conn, child = ctx.Pipe()
            process = ctx.Process(target=_arm_worker, args=(child, options), daemon=True)
            process.start()
            try:  # one at a time: compiling arms do not slow each other's timing
                conn.recv()
            except EOFError:
                raise SystemExit(f"error: arm {name} could not be compiled (its error is above)") from None
            workers[name] = conn, process
    times = {name: [] for name in workers}
    for _ in range(rounds):
        for name, (conn, _) in workers.items():
            conn.send(2)
            times[name].append(conn.recv())
    for conn, process in workers.values():
        conn.send(None)
        process.join(timeout=60)
    return {name: statistics.median(t) for name, t in times.items()}


def train_arm(name: str, options: list[str], steps: int, out: Path, data_dir: Path) -> dict:
    """Train the arm `steps` steps on the default corpus; return what it did."""
    run_dir = out / name
    from gptjax.options import parse_args

    data_cfg = parse_args(options).data
    vocab = str(data_cfg.bpe_vocab) if data_cfg.tokenizer == "bpe" else ""
    shards = data_dir / (data_cfg.tokenizer + vocab)
    options, data = _with_shards(options, data_cfg, shards) if data_cfg.mix else (options, [f"--data.dir={shards}"])
    argv = [sys.executable, str(Path(__file__).resolve().parents[2] / "train.py"), *options,
            f"--out_dir={run_dir}", *data, f"--train.max_steps={steps}",
            f"--train.warmup_steps={max(1, steps * 8 // 100)}", f"--train.eval_interval={steps}",
            f"--train.ckpt_interval={steps}", "--train.sample_tokens=0", f"--train.log_interval={max(1, steps // 10)}"]
    start = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"error: arm {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if "loss" in r][-1]
    return {"name": name, "options": options, "steps": steps, "wall_s": wall,
            "train_s": last_train["elapsed_s"], "train_loss": last_train["loss"]}


def _with_shards(options: list[str], data_cfg, shards: Path) -> tuple[list[str], list[str]]:
    """A mixture arm's options with {shards} (the default corpus's shards, prepared here first if no arm did
    yet, with the arm's tokenizer) and {numpy} (numpy's Python source) filled in; no --data.dir with a mix."""
    import numpy

    from gptjax.config import DataConfig
    from gptjax.data import prepare

    prepare(DataConfig(tokenizer=data_cfg.tokenizer, bpe_vocab=data_cfg.bpe_vocab), shards, log=lambda *_: None,
            shared=True)
    numpy_source = Path(numpy.__file__).parent / "**" / "*.py"
    return [o.format(shards=shards, numpy=numpy_source) if o.startswith("--data.mix=") else o for o in options], []


def validation_documents() -> list[str]:
    """The default corpus's validation documents, as every tokenizer's preparation holds them out."""
    from gptjax.config import DataConfig
    from gptjax.data.documents import in_val
    from gptjax.data.sources import Problems, Reader, corpus_files

    cfg = DataConfig()
    docs, current = [], None
    index = -1
    for piece in Reader(corpus_files(cfg.corpus), cfg.text_field, Problems()):
        if piece.where[2] == 0:
            index += 1
            current = [] if in_val(index, cfg.val_fraction) else None
            if current is not None:
                docs.append(current)
        if current is not None:
            current.append(piece.text)
    return ["".join(d) for d in docs]


def score(run_dir: Path, docs: list[str], batch: int = 16) -> float:
    """Bits per byte of `docs`, each scored from its start in windows of the model's context that do not
    overlap, through the one scorer (gptjax.model.score)."""
    from gptjax.inference.pretrained import load
    from gptjax.model.score import Scorer, sliding_windows

    model = load(run_dir)
    T, tok = model.config.model.block_size, model.tokenizer
    scorer = Scorer(model.graphdef, model.params, T, batch)
    windows = (w for doc in docs for w in sliding_windows([[tok.eot_id], tok.encode(doc)], T, T))
    nll = -sum(float(np.sum(s.logp, dtype=np.float64)) for s in scorer.windows(windows))
    return nll / (sum(len(d.encode("utf-8")) for d in docs) * math.log(2))


def bench_quality(args, rest: list[str]) -> None:
    from gptjax.bench.data import cpu_name

    if rest:
        raise SystemExit(f"error: unexpected arguments {' '.join(rest)}; arms take their options after a colon "
                         "(--arms 'mine:--model.n_layer=6 --model.n_embd=256').")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    each = f"{args.steps} steps" if args.steps else f"{args.budget:.0f} s of training"
    print(f"gptjax bench quality: {len(arms)} arms of {each} each on the default corpus; "
          f"CPU: {cpu_name()}, {os.cpu_count()} cores; results in {out / 'quality.json'}", flush=True)
    docs = validation_documents()
    print(f"scored on the default corpus's {len(docs)} validation documents, "
          f"{sum(len(d.encode()) for d in docs) / 1e3:,.0f} kB", flush=True)
    results = []
    plans = [(spec.partition(":")[0], arm_options(spec), args.budget) for spec in arms]
    if args.half:
        name, options, _ = plans[-1]
        plans.append((name + "@half", options, args.budget / 2))
    taken = [out / name for name, _, _ in plans if (out / name).exists()]
    if taken:
        raise SystemExit(f"error: {', '.join(map(str, taken))} already exist; give another --out or remove them.")
    if args.steps:
        seconds = {name: float("nan") for name, _, _ in plans}
    else:
        print("timing each arm's step (alternating rounds) ...", flush=True)
        seconds = step_seconds([(name.removesuffix("@half"), options) for name, options, _ in plans])
    for name, options, budget in plans:
        step_s = seconds[name.removesuffix("@half")]
        steps = round(args.steps * budget / args.budget) if args.steps else max(20, int(budget / step_s))
        print(f"{name}: {step_s * 1e3:,.0f} ms/step -> {steps} steps; {' '.join(options)}", flush=True)
        r = train_arm(name, options, steps, out, out / "data")
        r["bpb"] = score(out / name, docs)
        r["budget_s"], r["step_s"] = (0.0 if args.steps else budget), step_s
        results.append(r)
        print(f"{name}: {r['steps']} steps in {r['train_s']:.0f} s of training ({r['wall_s']:.0f} s in all), "
              f"validation {r['bpb']:.4f} bits/byte", flush=True)
        (out / "quality.json").write_text(json.dumps(results, indent=2))
    base = results[0]["bpb"]
    print(f"\n{'arm':28}{'budget s':>10}{'ms/step':>9}{'steps':>7}{'train s':>9}{'bits/byte':>11}{'vs first':>10}")
    for r in results:
        print(f"{r['name']:28}{r['budget_s']:10.0f}{r['step_s'] * 1e3:9,.0f}{r['steps']:7d}{r['train_s']:9.0f}"
              f"{r['bpb']:11.4f}{100 * (r['bpb'] / base - 1):+9.1f}%")
