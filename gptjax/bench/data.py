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
    from gptjax.data import pipeline
    from gptjax.data.sources import corpus_files
    from gptjax.data.workers import peak_rss

    from gptjax.runtime.malloc import return_large_blocks

    return_large_blocks()  # as python -m gptjax.data prepare does
    folder = argv[0]
    cfg = parse_args(argv[1:], prog="python -m gptjax.bench data", sections=("data",))
    files = corpus_files(cfg.data.corpus) + (corpus_files(cfg.data.val_corpus) if cfg.data.val_corpus else [])
    stats = {}
    t0 = time.perf_counter()
    ds = pipeline.prepare(cfg.data, folder, log=lambda m: print(m, file=sys.stderr, flush=True), stats=stats)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "seconds": seconds, "workers": stats["workers"], "files": len(files),
        "text_bytes": ds.meta["train_bytes"] + ds.meta["val_bytes"], "tokens": ds.train.size + ds.val.size,
        "documents": ds.meta["documents"], "raw_bytes": sum(f.stat().st_size for f in files),
        "rss": peak_rss(), "worker_rss": stats.get("worker_peak_rss", 0),
    }))


def sample_texts(cfg, budget_bytes: float) -> list[str]:
    """About `budget_bytes` of the corpus's documents, in pieces, at most a 64th from each file, the files
    taken in an order spread over the corpus."""
    from gptjax.data.sources import Problems, Reader, corpus_files

    files = corpus_files(cfg.corpus)
    step = max(1, len(files) // 64)
    texts, total = [], 0
    for f in (files[i] for s in range(step) for i in range(s, len(files), step)):
        taken = 0
        for piece in Reader([f], cfg.text_field, Problems(), skip_binary=len(files) > 1):
            texts.append(piece.text)
            taken += len(piece.text)
            if taken >= budget_bytes / 64:
                break
        total += taken
        if total >= budget_bytes:
            break
    return texts


def _encode_all(enc, texts: list[str]) -> None:
    for t in texts:
        enc.encode_to_numpy(t, disallowed_special=())


def _independent(enc, texts: list[str], nbytes: int, n: int) -> float:
    """MB/s of `n` processes each encoding all of `texts` on one thread at the same time: the most any
    parallel tokenizer can reach on this machine (cores that share a physical core, or memory, scale
    less than n-fold). The processes are forked: this process runs no JAX."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(n + 1)

    def work(out):
        start.wait()
        t0 = time.perf_counter()
        _encode_all(enc, texts)
        out.put(time.perf_counter() - t0)

    out = ctx.Queue()
    procs = [ctx.Process(target=work, args=(out,)) for _ in range(n)]
    for p in procs:
        p.start()
    start.wait()
    seconds = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return n * nbytes / max(seconds)


def tiktoken_rates(enc, texts: list[str], nbytes: int, cores: int) -> dict[str, float]:
    return {"one thread": rate(lambda ts: _encode_all(enc, ts), texts, nbytes),
            "encode_ordinary": rate(lambda ts: [enc.encode_ordinary(t) for t in ts], texts, nbytes),
            "pool": rate(lambda ts: enc.encode_ordinary_batch(ts, num_threads=cores), texts, nbytes),
            "independent": _independent(enc, texts, nbytes, cores)}


def rate(fn, texts: list[str], nbytes: int) -> float:
    t0 = time.perf_counter()
    fn(texts)
    return nbytes / (time.perf_counter() - t0)


def build_corpus(folder: Path, gib: float, fmt: str = "txt") -> None:
    """About `gib` GiB of real text, 128 files of 8 MiB per GiB, from what ships with this Python: the
    standard library's and the installed packages' source and documentation (.py, .md, .rst, .txt),
    repeated in a shuffled order until the size is reached. fmt: txt (one document per file), jsonl or
    jsonl.zst (one document per source file), parquet."""
    import random
    import sysconfig

    paths = sysconfig.get_paths()
    roots = sorted({Path(paths["stdlib"]), Path(paths["purelib"]), Path(paths["platlib"])})
    sources = sorted(p for r in roots for p in r.rglob("*") if p.suffix in (".py", ".md", ".rst", ".txt")
                     and p.is_file() and p.stat().st_size < 4 << 20)
    random.Random(0).shuffle(sources)
    folder.mkdir(parents=True, exist_ok=False)
    files = max(1, round(128 * gib))
    per_file, i = gib * 2**30 / files, 0
    for k in range(files):
        docs, size = [], 0
        while size < per_file:
            try:
                text = sources[i % len(sources)].read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                text = ""
            i += 1
            if text:
                docs.append(text)
                size += len(text.encode("utf-8"))
        name = folder / f"part{k:04d}"
        if fmt == "txt":
            name.with_suffix(".txt").write_text("".join(docs), encoding="utf-8")
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": docs}), name.with_suffix(".parquet"), row_group_size=1024)
        else:
            lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
            if fmt == "jsonl.zst":
                import zstandard

                lines = zstandard.ZstdCompressor(level=3).compress(lines)
            Path(f"{name}.{fmt}").write_bytes(lines)
    print(f"wrote {files} {fmt} files of about {per_file / 2**20:,.0f} MiB of text each to {folder}")


def bench_data(args, rest: list[str]) -> None:
    if args.build:
        build_corpus(Path(args.build), args.gib, fmt=args.format)
        return
    from gptjax.data.pipeline import default_workers
    from gptjax.tokenizer import get_tokenizer

    cfg = parse_args(rest, prog="python -m gptjax.bench data", sections=("data",))
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gptjax-bench-data-"))
    if args.keep and folder.exists() and any(folder.iterdir()):
        sys.exit(f"error: --keep {folder} is not empty; give a new folder, so that the preparation starts afresh.")
    cores = default_workers()
    print(f"gptjax bench data: corpus {cfg.data.corpus or 'stdlib'}, {cfg.data.tokenizer} tokenizer; CPU: "
          f"{cpu_name()}, {cores} cores", flush=True)
    texts = sample_texts(cfg.data, args.sample_mb * 1e6)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    learned = cfg.data.tokenizer == "bpe"  # known only once the preparation has learned it
    enc = None if learned else get_tokenizer(cfg.data.tokenizer).encoding
    before = None if learned else tiktoken_rates(enc, texts, nbytes, cores)  # the speed drifts: before and after
    try:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", "import sys; from gptjax.bench.data import run_child; "
                               "run_child(sys.argv[1:])", str(folder), *rest], stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(proc.returncode)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if learned:
            from gptjax.data.shards import folder_tokenizer, read_meta

            enc = folder_tokenizer(folder, read_meta(folder)).encoding
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    after = tiktoken_rates(enc, texts, nbytes, cores)
    before = before or after
    mb_s, workers = r["text_bytes"] / r["seconds"], r["workers"]
    print(f"preparation: {r['documents']:,} documents, {r['text_bytes'] / 1e6:,.1f} MB of text ({r['raw_bytes'] / 1e6:,.1f}"
          f" MB of files, {r['files']:,}) → {r['tokens']:,} tokens in {r['seconds']:.1f} s ({wall:.1f} s with the "
          f"process's start): {mb_s / 1e6:.2f} MB/s, {r['tokens'] / r['seconds']:,.0f} tokens/s, {workers} worker"
          f"{'s' if workers > 1 else ''}")
    bound = r["rss"] + (workers * r["worker_rss"] if workers > 1 else 0)
    print(f"peak memory: preparing process {r['rss'] / 2**20:,.0f} MiB"
          + (f", largest worker {r['worker_rss'] / 2**20:,.0f} MiB; in all at most {bound / 2**20:,.0f} MiB "
             f"(process + {workers} x worker)" if workers > 1 else " (tokenizing in the same process)"), flush=True)
    mean = {k: (before[k] + after[k]) / 2 for k in before}
    print(f"tiktoken alone on {nbytes / 1e6:.1f} MB of the same documents, before / after the preparation: one "
          f"thread {before['one thread'] / 1e6:.2f} / {after['one thread'] / 1e6:.2f} MB/s (encode_to_numpy; "
          f"encode_ordinary {before['encode_ordinary'] / 1e6:.2f} / {after['encode_ordinary'] / 1e6:.2f}); its own "
          f"{cores}-thread pool (encode_ordinary_batch) {before['pool'] / 1e6:.2f} / {after['pool'] / 1e6:.2f} MB/s")
    print(f"{cores} independent single-thread tokenizers at once (this machine's parallel ceiling): "
          f"{before['independent'] / 1e6:.2f} / {after['independent'] / 1e6:.2f} MB/s, "
          f"{mean['independent'] / mean['one thread']:.2f}x one thread")
    ratio = mb_s / (mean["one thread"] * workers)
    print(f"ratio: preparation / (one thread x {workers} worker{'s' if workers > 1 else ''}) = {ratio:.2f} "
          f"(target {TARGET}); against the ceiling: {mb_s / mean['independent']:.2f}; against tiktoken's own "
          f"pool: {mb_s / mean['pool']:.2f}x")
