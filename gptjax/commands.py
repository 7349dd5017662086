"""One command for every tool: `gptjax train|sample|serve|data|convert|bench|plot|eval|memory [options]`.

Each subcommand runs the `main(argv)` of one module with the arguments that follow its name, exactly
as `python train.py`, `python sample.py` or `python -m gptjax.<module>` does, so their options,
messages and exit statuses are the same. A module is imported only when its command runs (`gptjax
data` starts no JAX runtime), and adding a command is one row of COMMANDS.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys

from gptjax.errors import UserError, cli

# name: (the module whose main(argv) runs it, what it does)
COMMANDS = {
    "train": ("gptjax.train.__main__", "pretrain or fine-tune a model (what python train.py runs)"),
    "sample": ("gptjax.inference.sample", "continue prompts from a run directory or hf:DIR (what python sample.py runs)"),
    "serve": ("gptjax.inference.serve.__main__", "an OpenAI-compatible completions server of a run directory or hf:DIR"),
    "data": ("gptjax.data.__main__", "prepare token shards once, for many runs: gptjax data prepare [options]"),
    "convert": ("gptjax.weights.convert", "GPT-2 weights between a Hugging Face folder and a run directory"),
    "bench": ("gptjax.bench.__main__", "time the training step, sampling or data preparation"),
    "plot": ("gptjax.train.plot", "loss curves of one or more runs, as a PNG"),
    "eval": ("gptjax.eval.__main__", "score a model on a text and on zero-shot task files"),
    "memory": ("gptjax.bench.memory", "memory per device of the compiled training step, pmap against fsdp"),
}


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: gptjax COMMAND [options]        (gptjax COMMAND --help: that command's options)", "",
             "commands:"]
    for name, (module, what) in COMMANDS.items():
        missing = "" if available(module) else " (not available in this installation)"
        lines.append(f"  {name:<{width}}  {what}{missing}")
    return "\n".join(lines)


@cli
def find_command(name: str):
    """The module that runs `name`; a UserError for a name that is not a command, or one whose module is absent."""
    if name not in COMMANDS:
        hint = difflib.get_close_matches(name, COMMANDS, n=1)
        raise UserError(f"unknown command {name!r}." + (f" Did you mean {hint[0]!r}?" if hint else "")
                        + f" The commands are {', '.join(COMMANDS)}; gptjax --help says what each does.")
    module = COMMANDS[name][0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the module is there but something it needs is not: its own message says what
            raise
        here = ", ".join(n for n, (m, _) in COMMANDS.items() if available(m))
        raise UserError(f"gptjax {name} is not available in this installation of gptjax: it has no {module} module "
                        f"(a later version brings it). The commands available here are {here}.") from None


def main(argv: list[str], as_script: bool = False) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    find_command(argv[0], as_script=as_script).main(argv[1:], as_script=as_script)


def run() -> None:
    """The `gptjax` program that pip installs ([project.scripts] in pyproject.toml)."""
    main(sys.argv[1:], as_script=True)
