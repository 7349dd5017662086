"""Zero-shot tasks from JSON Lines files, one example per line, in one of two layouts:

  multiple choice (HellaSwag's layout; its own files read as they are):
    {"ctx": "A man is sitting on a roof. He", "endings": ["is using wrap ...", "starts pulling ..."], "label": 1}
  last word (LAMBADA's): {"text": "... a passage whose last word is to be predicted"}

A multiple-choice example is scored by the log-likelihood of each ending after the context (joined
by one space, unless the context ends or the ending begins with whitespace): `acc` takes the ending
with the highest sum, `acc_norm` the highest mean per token (as llm.c's HellaSwag evaluation; the
harness's acc_norm divides by characters instead). A last-word example splits the text before its
last word: `acc` counts the words the model continues with greedily, token for token, and
`perplexity` is exp(−mean log-likelihood of the word), per word.

A line that is not JSON, lacks a field or holds a label out of range is a UserError that names
file:line; an example longer than the model's context is skipped, counted and named.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptjax import paths
from gptjax.errors import UserError
from gptjax.model.score import Scorer

CHOICE, LAST_WORD = "multiple_choice", "last_word"
LAYOUTS = ('multiple choice: {"ctx": "...", "endings": ["...", "..."], "label": 0}, or last word: '
           '{"text": "... last word"}')
NAMED = 3  # skipped examples named in a warning


@dataclass
class Example:
    where: str  # file:line
    context: list[int]
    continuations: list[list[int]]
    label: int = 0


@dataclass
class Task:
    name: str
    path: Path
    kind: str
    examples: list[Example] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # file:line of examples longer than the context

    def warning(self) -> str | None:
        if not self.skipped:
            return None
        return (f"warning: {len(self.skipped)} example(s) of {self.path} are longer than the model's context and were "
                f"skipped: {', '.join(self.skipped[:NAMED])}{', ...' if len(self.skipped) > NAMED else ''}")


def _fail(where: str, message: str) -> UserError:
    return UserError(f"{where}: {message}. Each line of a task file is one example, {LAYOUTS}.")


def _parse(where: str, line: str) -> tuple[str, str, list[str], int]:
    """(kind, context, continuation texts, label) of one line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _fail(where, f"not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise _fail(where, f"a JSON {type(record).__name__}, not an object")
    if "endings" in record:
        ctx, endings, label = record.get("ctx"), record["endings"], record.get("label")
        if not isinstance(ctx, str):
            raise _fail(where, f'"ctx" must hold the context as a string, got {json.dumps(ctx)[:40]}')
        if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) and e for e in endings)):
            raise _fail(where, f'"endings" must be a list of at least two non-empty strings, got {json.dumps(endings)[:60]}')
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)  # the Hugging Face copy of HellaSwag stores "3"
        if isinstance(label, bool) or not isinstance(label, int):
            raise _fail(where, f'"label" must be the index of the right ending, got {json.dumps(label)}')
        if not 0 <= label < len(endings):
            raise _fail(where, f'"label" {label} is out of range for {len(endings)} endings (0 to {len(endings) - 1})')
        sep = "" if not ctx or ctx[-1].isspace() else " "
        return CHOICE, ctx, [("" if e[0].isspace() else sep) + e for e in endings], label
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise _fail(where, f'"text" must hold the passage as a non-empty string, got {json.dumps(text)[:40]}')
        text = text.rstrip()
        cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
        if cut <= 0:
            raise _fail(where, f"the text {text[:40]!r} has no last word after a space to predict")
        return LAST_WORD, text[:cut], [text[cut:]], 0
    raise _fail(where, f"no \"endings\" or \"text\" field (fields: {', '.join(list(record)[:8])})")


def read_task(path: str | Path, tokenizer, block_size: int) -> Task:
    """Read and tokenize a task file (relative, or under ~); examples that do not fit `block_size` + 1 tokens
    are skipped."""
    path = paths.expand(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist; give a .jsonl file with one example per line, {LAYOUTS}.")
    task = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            kind, context, continuations, label = _parse(where, line)
            if task is None:
                task = Task(path.name.split(".")[0], path, kind)
            elif kind != task.kind:
                raise _fail(where, f"a {kind.replace('_', ' ')} example in a file of {task.kind.replace('_', ' ')} "
                                   "examples; one file holds one layout")
            ctx = tokenizer.encode(context) or [tokenizer.eot_id]  # an empty context: the start of a document
            conts = [tokenizer.encode(c) for c in continuations]
            if len(ctx) + max(len(c) for c in conts) - 1 > block_size:
                task.skipped.append(where)
                continue
            task.examples.append(Example(where, ctx, conts, label))
    if task is None:
        raise UserError(f"task file {path} holds no examples; one example per line, {LAYOUTS}.")
    if not task.examples:
        raise UserError(f"no example of {path} fits the model's context of {block_size} tokens "
                        f"({len(task.skipped)} skipped, from {task.skipped[0]}); use a model with a longer context.")
    return task


def read_tasks(spec: str, tokenizer, block_size: int) -> list[Task]:
    """Comma-separated task files; their names (the file names before the first dot) must differ."""
    tasks = [read_task(p.strip(), tokenizer, block_size) for p in spec.split(",") if p.strip()]
    names = [t.name for t in tasks]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two task files are named {name!r} ({', '.join(str(t.path) for t in tasks if t.name == name)}); "
                            "task figures are reported by file name, so rename one.")
    return tasks


def score_task(scorer: Scorer, task: Task) -> dict:
    """The task's figures: accuracy (and normalised accuracy, or the last word's perplexity), counts."""
    requests = [(ex.context, c) for ex in task.examples for c in ex.continuations]
    scores = iter(scorer.requests(requests))
    out = {"kind": task.kind, "examples": len(task.examples), "skipped": len(task.skipped)}
    if task.kind == CHOICE:
        right = right_norm = 0
        for ex in task.examples:
            ll = np.array([next(scores)[0] for _ in ex.continuations])
            per_token = ll / np.array([len(c) for c in ex.continuations])
            right += int(np.argmax(ll) == ex.label)
            right_norm += int(np.argmax(per_token) == ex.label)
        return {**out, "acc": right / len(task.examples), "acc_norm": right_norm / len(task.examples)}
    lls, greedy = zip(*scores)
    return {**out, "acc": float(np.mean(greedy)), "perplexity": math.exp(-float(np.mean(lls)))}


def summary(name: str, figures: dict) -> str:
    """One line: the task, its counts and its figures."""
    counts = f"{figures['examples']:,} examples" + (f", {figures['skipped']:,} skipped" if figures["skipped"] else "")
    values = "  ".join(f"{k} {figures[k]:.4f}" for k in ("acc", "acc_norm", "perplexity") if k in figures)
    return f"task {name} ({figures['kind'].replace('_', ' ')}, {counts}): {values}"
