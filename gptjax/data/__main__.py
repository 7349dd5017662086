"""`python -m gptjax.data prepare [--config=PRESET] [--data.key=value ...]`: prepare token shards once, for many runs."""

import sys
from pathlib import Path

from gptjax.data import mixture
from gptjax.data.pipeline import prepare
from gptjax.errors import UserError, cli
from gptjax.runtime.malloc import return_large_blocks
from gptjax.options import parse_args

INTRO = ("Tokenize a corpus into a folder of token shards (train.bin, val.bin, meta.json) on every core. The\n"
         "folder is --data.dir, or <out_dir>/data; train on it with --data.dir=FOLDER (several folders: a\n"
         "comma-separated list or a glob). A stopped preparation continues when run again.")


@cli
def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m gptjax.data prepare [--config=PRESET] [--data.key=value ...]\n\n" + INTRO
              + "\n\nSee python -m gptjax.data prepare --help for the options.")
        return
    if argv[0] != "prepare":
        raise UserError(f"unknown command {argv[0]!r}; the command is: python -m gptjax.data prepare [options].")
    cfg = parse_args(argv[1:], prog="python -m gptjax.data prepare", intro=INTRO, sections=("data",),
                     default_preset="cpu")
    return_large_blocks()  # flat memory however long the preparation (train.py's process keeps its own settings)
    if cfg.data.mix:  # the sources that are corpora, into <out_dir>/data/<NAME>, as train.py prepares them
        mixture.load(cfg.data, Path(cfg.out_dir) / "data", block_size=0)
        return
    folder = Path(cfg.data.dir) if cfg.data.dir else Path(cfg.out_dir) / "data"
    if "," in cfg.data.dir:
        raise UserError("prepare writes one folder: give a single --data.dir.")
    prepare(cfg.data, folder, shared=bool(cfg.data.dir))


if __name__ == "__main__":
    main(sys.argv[1:])
