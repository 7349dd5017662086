"""Benchmarks that print figures (never timed tests), one subcommand each.

  python -m gptjax.bench sample [--compare torch] [--model reference|gpt2-124m] [--batch 1 16] ...
  python -m gptjax.bench serve [--clients 1 4 16 64] [--requests 64] [--slots 16] ...
  python -m gptjax.bench train [--compare torch] [--steps 5] [--rounds 5] [--config=PRESET --section.key=value ...]
  python -m gptjax.bench data [--data.corpus=SPEC --data.workers=N ...] [--sample-mb 64]
  python -m gptjax.bench quality [--budget 300] [--arms gpt2,rope,...,NAME:OPTIONS] [--half] [--steps N]

`sample` times decoding (gptjax.bench.sample), `serve` the completions server (gptjax.bench.serve), `train` the training step (gptjax.bench.train),
`data` the preparation of token shards (gptjax.bench.data) and `quality` what each option reaches
in a fixed time (gptjax.bench.quality); each module's docstring says what it measures. Each is imported only when asked for, so that `data` starts no JAX runtime.
"""

from __future__ import annotations

import argparse

from gptjax.errors import cli
from gptjax.inference.serve import SCHEDULER_STEPS

MODELS = ("gpt2-124m", "reference")  # the shapes in gptjax.bench.sample.MODELS


def _bench_sample(args, rest) -> None:
    from gptjax.bench.sample import bench_sample

    bench_sample(args)


def _bench_train(args, rest) -> None:
    from gptjax.bench.train import bench_train

    bench_train(args, rest)


def _bench_quality(args, rest) -> None:
    from gptjax.bench.quality import bench_quality

    bench_quality(args, rest)


def _bench_serve(args, rest) -> None:
    from gptjax.bench.serve import bench_serve

    bench_serve(args)


def _bench_data(args, rest) -> None:
    from gptjax.bench.data import bench_data

    bench_data(args, rest)


def _sample_parser(commands) -> None:
    """python -m gptjax.bench sample: decoding speed against its bounds."""
    sample = commands.add_parser("sample", help="decoding speed, time to first token and compile time")
    sample.add_argument("--compare", choices=["torch"], help="also time transformers' GPT2LMHeadModel.generate")
    sample.add_argument("--model", choices=sorted(MODELS), default="reference", help="the shape (default: reference)")
    sample.add_argument("--dtype", choices=["float32", "bfloat16"], nargs="+", default=["float32"],
                        help="compute dtypes, each timed against its own bound (default: float32)")
    sample.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    sample.add_argument("--prompt_tokens", type=int, default=16, help="prompt length (default: 16)")
    sample.add_argument("--new_tokens", type=int, default=200, help="tokens to generate (default: 200)")
    sample.add_argument("--runs", type=int, default=5, help="timed runs per figure (default: 5)")
    sample.set_defaults(run=_bench_sample)


def _serve_parser(commands) -> None:
    """python -m gptjax.bench serve: the completions server under concurrent clients."""
    serve = commands.add_parser("serve", help="the completions server: tokens/s, time to first token and between "
                                              "tokens at several numbers of concurrent clients")
    serve.add_argument("--model", choices=sorted(MODELS), default="reference", help="the shape (default: reference)")
    serve.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64],
                       help="concurrent clients (default: 1 4 16 64)")
    serve.add_argument("--requests", type=int, default=64, help="requests per figure (default: 64)")
    serve.add_argument("--slots", type=int, default=16, help="the server's slots (default: 16)")
    serve.add_argument("--prompt_tokens", type=int, default=16, help="prompt length (default: 16)")
    serve.add_argument("--new_tokens", type=int, default=200,
                       help="tokens per completion (default: 200, as bench sample's)")
    serve.add_argument("--scheduler_steps", type=int, default=SCHEDULER_STEPS,
                       help=f"the server's tokens per row per compiled call (default: {SCHEDULER_STEPS})")
    serve.set_defaults(run=_bench_serve)


def _train_parser(commands) -> None:
    """python -m gptjax.bench train: the training step's speed and memory."""
    train = commands.add_parser("train", help="training step time, tokens/s, TFLOP/s, MFU, memory, compile time",
                                epilog="other options (--config=PRESET, --model.n_layer=12, --train.batch_size=16, "
                                       "...) set the model and batch as in train.py; without --config, the "
                                       "reference shape (6 layers, 6 heads, width 384, context 256, batch 8, "
                                       "vocabulary 50304)")
    train.add_argument("--compare", choices=["torch"], help="also time transformers' GPT2LMHeadModel with AdamW")
    train.add_argument("--steps", type=int, default=3, help="steps per timed round (default: 3)")
    train.add_argument("--rounds", type=int, default=5, help="timed rounds; figures are medians (default: 5)")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default: 2)")
    train.add_argument("--peak-tflops", "--peak_tflops", type=float, dest="peak_tflops",
                       help="peak TFLOP/s per device for MFU (default: the device table; on a CPU, measured)")
    train.add_argument("--max-batch", "--max_batch", action="store_true", dest="max_batch",
                       help="then find the largest batch size that fits, doubling from --train.batch_size")
    train.set_defaults(run=_bench_train)


def _data_parser(commands) -> None:
    """python -m gptjax.bench data: preparing token shards, against tiktoken's own rate."""
    data = commands.add_parser("data", help="preparation of token shards: MB/s, tokens/s, peak memory, against "
                                            "tiktoken's own rate on the same files",
                               epilog="other options (--data.corpus=SPEC, --data.workers=N, --data.tokenizer=byte, "
                                      "--data.text_field=...) are those of python -m gptjax.data prepare; without "
                                      "--data.corpus, the Python standard library's source")
    data.add_argument("--sample-mb", "--sample_mb", type=float, default=64, dest="sample_mb",
                      help="MB of the corpus's text, spread over its files, on which tiktoken's single-thread rate "
                           "is measured (default: 64)")
    data.add_argument("--keep", metavar="DIR", help="prepare into DIR and keep it (default: a temporary folder, "
                                                    "removed afterwards)")
    data.add_argument("--build", metavar="DIR", help="instead of timing: write a corpus of real text to DIR from the "
                                                    "installed Python's sources and documentation (see --gib, --format)")
    data.add_argument("--gib", type=float, default=1.0, help="with --build: its size in GiB (default: 1)")
    data.add_argument("--format", choices=["txt", "jsonl", "jsonl.zst", "parquet"], default="txt",
                      help="with --build: the files' format (default: txt, one document per file)")
    data.set_defaults(run=_bench_data)


def _quality_parser(commands) -> None:
    """python -m gptjax.bench quality: bits per byte per option in a fixed budget."""
    quality = commands.add_parser("quality", help="validation bits per byte that each option reaches in a fixed "
                                                  "wall-clock budget of training on the default corpus")
    quality.add_argument("--budget", type=float, default=300, help="seconds of training steps per arm (default: 300)")
    quality.add_argument("--arms", default="gpt2,rope,rmsnorm,qk_norm,relu2,swiglu,untied,no_bias,gqa,muon,bpe8k",
                         help="comma-separated arms: names of levers on top of the GPT-2 baseline (joined with + to "
                              "combine), or NAME:OPTIONS for options of its own ('old:--config=cpu-gpt2'); the "
                              "first is the reference of the last column (default: the baseline and every lever)")
    quality.add_argument("--half", action="store_true", help="also run the last arm in half the budget")
    quality.add_argument("--steps", type=int, default=0, help="train every arm this many steps instead of timing "
                                                             "it against the budget (options that do not change "
                                                             "the step's cost compare exactly, on a busy machine too)")
    quality.add_argument("--out", default="out/quality", help="where the runs and quality.json go (default: "
                                                             "out/quality)")
    quality.set_defaults(run=_bench_quality)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gptjax.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_sample_parser, _serve_parser, _train_parser, _data_parser, _quality_parser):
        add(commands)
    args, rest = parser.parse_known_args(argv)
    if args.command in ("train", "quality"):
        from gptjax.runtime.cpu import tune_for_cpu

        tune_for_cpu()  # as train.py does, before JAX starts its runtime
    if args.command in ("sample", "serve") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run(args, rest)


if __name__ == "__main__":
    main()
