"""Evaluate a checkpoint: `python -m gptjax.eval RUN_DIR|hf:DIR [--step=N] [--text=SPEC|NAME=SPEC,...]
[--task=FILE.jsonl,...] [--stride=N] [--output=FILE.json]`. Figures go to standard output, and with --output to a
JSON file: a text's under "text"; named texts' each under "texts", and all of them together under "text"."""

from __future__ import annotations

import json
import sys
import time

from gptjax import paths

from gptjax.config import EvalConfig
from gptjax.runtime.cpu import tune_for_cpu
from gptjax.errors import UserError, cli
from gptjax.options import parse_flat, to_dict

INTRO = ("Evaluate a checkpoint: loss, perplexity and bits per byte of a text or of named texts (--text), accuracy "
         "on zero-shot task files (--task). The checkpoint is the first argument: a run directory, a checkpoint step "
         "directory or hf:DIR.")


class ProgressLine:
    """A line on standard error that redraws after each batch, in a terminal; nothing in a log."""

    def __init__(self, name: str = "", stream=None):
        # standard error as it is now, not as it was when this module was imported (a test's capture, say)
        self.stream, self.start, self.name = stream or sys.stderr, time.perf_counter(), name
        self.shown = self.stream.isatty()

    def update(self, tokens: int, share: float) -> None:
        if self.shown:
            rate = tokens / max(time.perf_counter() - self.start, 1e-9)
            width = 24
            filled = int(width * min(share, 1.0))
            name = f"{self.name} " if self.name else ""
            self.stream.write(f"\r\033[Kscoring {name}[{'#' * filled}{'.' * (width - filled)}] {share:4.0%} of the "
                              f"input | {tokens:,} tokens | {rate:,.0f} tok/s")
            self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def parse(argv: list[str]) -> EvalConfig:
    if argv and not argv[0].startswith("-"):  # the checkpoint, as the first argument
        argv = [f"--checkpoint={argv[0]}", *argv[1:]]
    if sum(a == "--text" or a.startswith("--text=") for a in argv) > 1:  # the option parser keeps the last
        raise UserError("--text is given more than once: name several texts in one --text, as --data.mix names its "
                        "sources, e.g. --text='web=held_out/web,code=held_out/code'.")
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


def table(scores: list, total: dict) -> str:
    """Named texts' figures, one row each, and the row of all of them together."""
    def row(name, f, rate=""):
        bpb = f"{f['bits_per_byte']:.4f}" if f["bits_per_byte"] is not None else "n/a"
        return (f"{name:<{width}} {f['tokens']:>11,} {f['bytes']:>13,} {f['documents']:>9,} {f['loss']:>7.4f} "
                f"{f['perplexity']:>10.3f} {bpb:>9} {rate:>10}").rstrip()

    width = max(4, *(len(name) for name, *_ in scores))
    lines = [f"{'text':<{width}} {'tokens':>11} {'bytes':>13} {'documents':>9} {'loss':>7} {'perplexity':>10} "
             f"{'bits/byte':>9} {'tokens/s':>10}"]
    lines += [row(name, figures, f"{score.tokens_per_s:,.0f}") for name, _, score, figures in scores]
    return "\n".join(lines + [row("all", total)] + [f"  {name}: {spec}" for name, spec, *_ in scores])


@cli
def main(argv: list[str]) -> dict:
    cfg = parse(argv)
    tune_for_cpu()  # before JAX starts: a batch's logits are large buffers, as in training
    from gptjax.eval.tasks import read_tasks, score_task, summary
    from gptjax.eval.text import (check_stride, find_text, mixture_texts, overall, parse_texts, score_shards,
                                  score_text)
    from gptjax.inference.pretrained import load
    from gptjax.model.products import explain_dtype
    from gptjax.model.score import Scorer

    own_mix = cfg.text == "mix" and not paths.expand("mix").exists()  # a text of that name is read as one
    texts = [] if own_mix else [find_text(name, spec) for name, spec in parse_texts(cfg.text)]  # before the model
    model = load(cfg.checkpoint, None if cfg.step < 0 else cfg.step, None if cfg.dtype == "checkpoint" else cfg.dtype)
    if own_mix:
        texts = mixture_texts(model.config, model.path)
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
    scores = []
    for text in texts:
        progress = ProgressLine(text.name)
        if text.shards is not None:  # tokens as they are: no document to skip
            score, problems = score_shards(scorer, text, model.tokenizer, stride, progress.update), None
        else:
            score, problems = score_text(scorer, text.files, model.tokenizer, stride, cfg.text_field, progress.update)
        progress.close()
        for line in problems.lines() if problems else ():
            print(f"warning: {f'{text.name}: ' if text.name else ''}{line}", file=sys.stderr)
        scores.append((text.name, text.spec, score,
                       {**score.as_dict(), "problems": problems.state()["counts"] if problems else {}}))
    if len(scores) == 1 and not scores[0][0]:  # one text, unnamed
        _, _, score, results["text"] = scores[0]
        bpb = f"{score.bits_per_byte:.4f}" if score.bits_per_byte is not None else "n/a (no bytes)"
        print(f"text {cfg.text}: {score.tokens:,} tokens, {score.bytes:,} bytes, {score.documents:,} documents; "
              f"windows of {T} tokens every {stride}")
        print(f"  loss {score.loss:.4f} | perplexity {score.perplexity:.3f} | bits per byte {bpb} | "
              f"{score.tokens_per_s:,.0f} tokens/s")
    elif scores:
        results["texts"] = {name: {**figures, "text": spec} for name, spec, _, figures in scores}
        results["text"] = overall([score for _, _, score, _ in scores])
        print(table(scores, results["text"]))
        print(f"windows of {T} tokens every {stride}; all: the texts as one (their bits per byte weighted by their "
              "bytes, their loss by their tokens)")
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
