"""GPT-2 weights between the Hugging Face layout and gptjax, both ways (the layout itself: gptjax.weights.hf).

  gptjax convert from-hf HF_DIR OUT_DIR          a GPT2LMHeadModel folder -> a gptjax run directory
  gptjax convert to-hf RUN_DIR HF_DIR [--step=N]  a gptjax checkpoint -> config.json + model.safetensors

`gptjax.load("hf:HF_DIR")` (and `sample.py --checkpoint=hf:HF_DIR`) reads an HF folder directly.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from gptjax import paths
from gptjax.config import Config
from gptjax.errors import UserError, cli
from gptjax.options import to_dict, to_toml
from gptjax.runtime import disk

# the weights' modules (JAX, orbax) are imported where they are used: `gptjax convert --help` and a
# mistyped command answer at once

USAGE = ("usage: gptjax convert from-hf HF_DIR OUT_DIR\n"
         "       gptjax convert to-hf RUN_DIR HF_DIR [--step=N]\n"
         "HF_DIR is a local GPT2LMHeadModel folder (config.json plus model.safetensors or pytorch_model.bin).")


def load_params(path, step: int | None = None) -> tuple[Config, dict]:
    """(config, nested float32 params) of a gptjax run directory or of 'hf:DIR'."""
    from gptjax.weights import sources

    source = sources.read(path, step)
    return source.config, source.params


def save_run(config: Config, params, out_dir, source: str) -> Path:
    """Write params as step 0 of a run directory, with the meta the trainer writes; no optimizer state."""
    from gptjax.weights.checkpoint import CHECKPOINTS, Checkpointer

    out = paths.expand(out_dir)
    if (out / CHECKPOINTS).is_dir() and any(p.name.isdigit() for p in (out / CHECKPOINTS).iterdir()):
        raise UserError(f"{out} already holds checkpoints; choose another output folder. Nothing was changed.")
    config = dataclasses.replace(config, out_dir=str(out))
    text = to_toml(config)
    with disk.writing(out / "config.toml", "the run's config", len(text)):
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(text)
    ckpt = Checkpointer(out, keep=1)  # a full disk: its message, the partial checkpoint removed
    ckpt.save(0, params, {}, {"step": 0, "config": to_dict(config), "tokenizer": config.data.tokenizer,
                              "val_loss": None, "data": {"source": source, "fingerprint": None}})
    ckpt.close()
    return out


@cli
def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        return print(USAGE)
    steps = [a for a in argv if a.startswith("--step=")]
    args = [a for a in argv if a not in steps]
    if len(args) != 3 or args[0] not in ("from-hf", "to-hf") or (steps and args[0] != "to-hf") or len(steps) > 1:
        raise UserError(f"unexpected arguments {' '.join(argv)!r}.\n{USAGE}")
    command, src, dst = args
    from gptjax.weights.hf import from_hf, hf_folder, save_hf

    if command == "from-hf":
        config, params = from_hf(src)
        out = save_run(config, params, dst, source=f"hf:{hf_folder(src).absolute()}")
        return print(f"wrote {out} (step 0 of a run directory; open it with gptjax.load or sample.py)")
    try:
        step = int(steps[0].split("=", 1)[1]) if steps else None
    except ValueError:
        raise UserError(f"--step expects an integer, got {steps[0]!r}.") from None
    config, params = load_params(src, step)
    out = save_hf(config, params, dst)
    print(f"wrote {out}: config.json and model.safetensors for transformers' GPT2LMHeadModel.from_pretrained")
    if config.data.doc_mask:
        print("note: this run was trained with --data.doc_mask; transformers' GPT-2 attends across end-of-text, "
              "so it computes what the run's model does on windows of one document (starting at position 0 "
              "with --data.doc_positions=restart)")


if __name__ == "__main__":
    main(sys.argv[1:])
