"""`python -m gptjax.bench data`: how fast token shards are prepared and in how much memory, against
tiktoken's own rate on the same files.

The preparation runs in a child process of its own, as `python -m gptjax.data prepare` would, into
a fresh folder, so that its peak memory is its own. Printed: MB of text per second and tokens per
second over the whole preparation (the tokenizer's and the workers' start, reading, decompressing,
parsing and writing included), the peak resident memory of the preparing process and of its
largest worker, and their sum bound (process + workers x largest worker). Then tiktoken alone,
single-threaded, on up to --sample-mb MB of the same documents (read through the same readers,
spread over the files): `encode_to_numpy`, its fastest path and the one the workers use, and
`encode_ordinary`; and its own thread pool (`encode_ordinary_batch`) on every core. The ratio is
the preparation's MB/s over (the single-thread MB/s x workers): 1.0 would be perfect scaling.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptjax.options import parse_args

TARGET = 0.85


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run_child(argv: list[str]) -> None:
    """In the child: prepare, then print what was done and the peak memory as one JSON line."""
    from gptjax.data.pipeline import choose_workers, prepare
    from gptjax.data.sources import corpus_files

    folder = argv[0]
    cfg = parse_args(argv[1:], prog="python -m gptjax.bench data", sections=("data",))
    files = corpus_files(cfg.data.corpus) + (corpus_files(cfg.data.val_corpus) if cfg.data.val_corpus else [])
    t0 = time.perf_counter()
    ds = prepare(cfg.data, folder, log=lambda m: print(m, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({
        "seconds": seconds, "workers": choose_workers(cfg.data, files), "files": len(files),
        "text_bytes": ds.meta["train_bytes"] + ds.meta["val_bytes"], "tokens": ds.train.size + ds.val.size,
        "documents": ds.meta["documents"], "raw_bytes": sum(f.stat().st_size for f in files),
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
        "worker_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
    }))


def sample_texts(cfg, budget_bytes: float) -> list[str]:
    """Up to `budget_bytes` of the corpus's documents, an equal share from each file, in pieces."""
    from gptjax.data.sources import Problems, Reader, corpus_files

    files = corpus_files(cfg.corpus)
    share = budget_bytes / len(files)
    texts = []
    for f in files:
        taken = 0
        for piece in Reader([f], cfg.text_field, Problems(), skip_binary=len(files) > 1):
            texts.append(piece.text)
            taken += len(piece.text)
            if taken >= share:
                break
    return texts


def rate(fn, texts: list[str], nbytes: int) -> float:
    t0 = time.perf_counter()
    fn(texts)
    return nbytes / (time.perf_counter() - t0)


def bench_data(args, rest: list[str]) -> None:
    from gptjax.data.pipeline import default_workers
    from gptjax.tokenizer import get_tokenizer

    cfg = parse_args(rest, prog="python -m gptjax.bench data", sections=("data",))
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gptjax-bench-data-"))
    if args.keep and folder.exists() and any(folder.iterdir()):
        sys.exit(f"error: --keep {folder} is not empty; give a new folder, so that the preparation starts afresh.")
    cores = default_workers()
    print(f"gptjax bench data: corpus {cfg.data.corpus or 'stdlib'}, {cfg.data.tokenizer} tokenizer; CPU: "
          f"{cpu_name()}, {cores} cores", flush=True)
    try:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", "import sys; from gptjax.bench_data import run_child; "
                               "run_child(sys.argv[1:])", str(folder), *rest], stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(proc.returncode)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    mb_s, workers = r["text_bytes"] / r["seconds"], r["workers"]
    print(f"preparation: {r['documents']:,} documents, {r['text_bytes'] / 1e6:,.1f} MB of text ({r['raw_bytes'] / 1e6:,.1f}"
          f" MB of files, {r['files']:,}) → {r['tokens']:,} tokens in {r['seconds']:.1f} s ({wall:.1f} s with the "
          f"process's start): {mb_s / 1e6:.2f} MB/s, {r['tokens'] / r['seconds']:,.0f} tokens/s, {workers} worker"
          f"{'s' if workers > 1 else ''}")
    bound = r["rss"] + (workers * r["worker_rss"] if workers > 1 else 0)
    print(f"peak memory: preparing process {r['rss'] / 2**20:,.0f} MiB"
          + (f", largest worker {r['worker_rss'] / 2**20:,.0f} MiB; in all at most {bound / 2**20:,.0f} MiB "
             f"(process + {workers} x worker)" if workers > 1 else " (tokenizing in the same process)"), flush=True)

    texts = sample_texts(cfg.data, args.sample_mb * 1e6)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    enc = get_tokenizer(cfg.data.tokenizer).encoding
    single = rate(lambda ts: [enc.encode_to_numpy(t, disallowed_special=()) for t in ts], texts, nbytes)
    ordinary = rate(lambda ts: [enc.encode_ordinary(t) for t in ts], texts, nbytes)
    pooled = rate(lambda ts: enc.encode_ordinary_batch(ts, num_threads=cores), texts, nbytes)
    print(f"tiktoken alone on {nbytes / 1e6:.1f} MB of the same documents: one thread {single / 1e6:.2f} MB/s "
          f"(encode_to_numpy; encode_ordinary {ordinary / 1e6:.2f}); its own {cores}-thread pool "
          f"(encode_ordinary_batch) {pooled / 1e6:.2f} MB/s")
    ratio = mb_s / (single * workers)
    print(f"ratio: preparation / (one thread x {workers} worker{'s' if workers > 1 else ''}) = {ratio:.2f} "
          f"(target {TARGET}); against tiktoken's own pool: {mb_s / pooled:.2f}x")
