"""Pretrain a GPT: `gptjax train` or `python train.py` [--config=PRESET] [--section.key=value ...] (see --help).

The command-line front of gptjax.train.trainer. It lives in the package so that an installed gptjax has it;
the top-level train.py runs it.
"""

import signal
import sys

from gptjax.runtime.cpu import tune_for_cpu
from gptjax.errors import cli
from gptjax.options import parse_args

INTRO = ("Pretrain a GPT on a text corpus. With no options: a small model on the Python standard\n"
         "library's source, on this machine's CPU. Options come from a preset (--config) and then\n"
         "the command line; names take '-' or '_'.")


@cli
def main(argv: list[str]) -> None:
    tune_for_cpu()  # before JAX starts its runtime
    cfg = parse_args(argv, prog="train.py", intro=INTRO, default_preset="cpu")
    from gptjax.train.trainer import train  # after the options: --help and a wrong option answer without JAX

    history = train(cfg)
    if history["interrupted"]:  # saved and stopped on a signal: exit as that signal would, 128 + its number
        sys.exit(128 + getattr(signal, history["interrupted"]))


if __name__ == "__main__":
    main(sys.argv[1:])
