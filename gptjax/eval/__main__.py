"""Evaluate a checkpoint: `python -m gptjax.eval RUN_DIR|hf:DIR [--step=N] [--text=SPEC] [--task=FILE.jsonl,...]
[--stride=N] [--output=FILE.json]`. Figures go to standard output, and with --output to a JSON file."""

from __future__ import annotations

import json
import sys
import time

from gptjax import paths

from gptjax.config import EvalConfig
from gptjax.runtime.cpu import tune_for_cpu
from gptjax.data.sources import corpus_files
from gptjax.errors import UserError, cli
from gptjax.options import parse_flat, to_dict

INTRO = ("Evaluate a checkpoint: loss, perplexity and bits per byte of a text (--text), accuracy on zero-shot task "
         "files (--task). The checkpoint is the first argument: a run directory, a checkpoint step directory or "
         "hf:DIR.")


class ProgressLine:
    """A line on standard error that redraws after each batch, in a terminal; nothing in a log."""

    def __init__(self, stream=None):
        # standard error as it is now, not as it was when this module was imported (a test's capture, say)
        self.stream, self.start = stream or sys.stderr, time.perf_counter()
        self.shown = self.stream.isatty()

    def update(self, tokens: int, share: float) -> None:
        if self.shown:
            rate = tokens / max(time.perf_counter() - self.start, 1e-9)
            width = 24
            filled = int(width * min(share, 1.0))
            self.stream.write(f"\r\033[Kscoring [{'#' * filled}{'.' * (width - filled)}] {share:4.0%} of the input | "
                              f"{tokens:,} tokens | {rate:,.0f} tok/s")
            self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def parse(argv: list[str]) -> EvalConfig:
    if argv and not argv[0].startswith("-"):  # the checkpoint, as the first argument
        argv = [f"--checkpoint={argv[0]}", *argv[1:]]
    cfg = parse_flat(EvalConfig, argv, prog="python -m gptjax.eval", intro=INTRO)
    if not cfg.checkpoint:
        raise UserError("give the checkpoint to evaluate first: python -m gptjax.eval out/run --text=FILE "
                        "(a run directory, a checkpoint step directory or hf:DIR).")
    if not cfg.text and not cfg.task:
        raise UserError("nothing to evaluate: give --text=FILE|FOLDER|GLOB to score a text, --task=FILE.jsonl for "
                        "zero-shot tasks, or both.")
    if cfg.output and not paths.expand(cfg.output).parent.is_dir():
        raise UserError(f"--output {cfg.output}: the folder {paths.expand(cfg.output).parent} does not exist.")
    return cfg


@cli
def main(argv: list[str]) -> dict:
    cfg = parse(argv)
    tune_for_cpu()  # before JAX starts: a batch's logits are large buffers, as in training
    files = corpus_files(cfg.text, option="--text") if cfg.text else []  # checked before the model is loaded
    from gptjax.eval.tasks import read_tasks, score_task, summary
    from gptjax.eval.text import check_stride, score_text
    from gptjax.inference.pretrained import load
    from gptjax.model.products import explain_dtype
    from gptjax.model.score import Scorer

    model = load(cfg.checkpoint, None if cfg.step < 0 else cfg.step, None if cfg.dtype == "checkpoint" else cfg.dtype)
    T = model.config.model.block_size
    stride = check_stride(cfg.stride, T)
    tasks = read_tasks(cfg.task, model.tokenizer, T) if cfg.task else []
    why = explain_dtype(model.config.model).why
    print(f"evaluating {model!r}{f' ({why})' if why != 'as set' else ''}")
    scorer = Scorer(model.graphdef, model.params, T, cfg.batch_size)
    results = {"checkpoint": str(model.path), "step": model.step, "tokenizer": model.tokenizer.name,
               "model": to_dict(model.config.model), "compute_dtype": model.dtype,
               "settings": {"text": cfg.text, "text_field": cfg.text_field, "stride": stride, "context": T,
                            "batch_size": cfg.batch_size, "task": cfg.task}}
    if files:
        progress = ProgressLine()
        score, problems = score_text(scorer, files, model.tokenizer, stride, cfg.text_field, progress.update)
        progress.close()
        for line in problems.lines():
            print(f"warning: {line}", file=sys.stderr)
        results["text"] = {**score.as_dict(), "problems": problems.state()["counts"]}
        bpb = f"{score.bits_per_byte:.4f}" if score.bits_per_byte is not None else "n/a (no bytes)"
        print(f"text {cfg.text}: {score.tokens:,} tokens, {score.bytes:,} bytes, {score.documents:,} documents; "
              f"windows of {T} tokens every {stride}")
        print(f"  loss {score.loss:.4f} | perplexity {score.perplexity:.3f} | bits per byte {bpb} | "
              f"{score.tokens_per_s:,.0f} tokens/s")
    if tasks:
        results["tasks"] = {}
    for task in tasks:
        if task.warning():
            print(task.warning(), file=sys.stderr)
        figures = score_task(scorer, task)
        results["tasks"][task.name] = {**figures, "file": str(task.path), "skipped_examples": task.skipped[:10]}
        print(summary(task.name, figures))
    if cfg.output:
        paths.expand(cfg.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {cfg.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
