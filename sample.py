"""Sample continuations from a trained model: `python sample.py --checkpoint=out/run --prompt='def '`."""

import sys
from pathlib import Path

from gptjax.config import SampleConfig, parse_flat
from gptjax.errors import UserError, cli
from gptjax.pretrained import load

INTRO = "Sample continuations of a prompt from a checkpoint. The prompt comes from --prompt, --prompt_file or stdin."


def read_prompt(cfg: SampleConfig) -> str:
    if cfg.prompt and cfg.prompt_file:
        raise UserError("give --prompt or --prompt_file, not both.")
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise UserError(f"prompt file {path} does not exist.")
        return path.read_text(encoding="utf-8", errors="replace")
    if cfg.prompt:
        return cfg.prompt
    if not sys.stdin.isatty():
        return sys.stdin.read()
    return ""


@cli
def main(argv: list[str]) -> None:
    cfg = parse_flat(SampleConfig, argv, prog="sample.py", intro=INTRO)
    prompt = read_prompt(cfg)
    model = load(cfg.checkpoint, None if cfg.step < 0 else cfg.step)
    n_prompt = len(model.tokenizer.encode(prompt))
    block = model.config.model.block_size
    if n_prompt > block:
        print(f"warning: the prompt has {n_prompt} tokens, more than the context of {block}; "
              f"only its last {block} tokens are used.", file=sys.stderr)
    outs = model.generate([prompt] * cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed)
    for i, text in enumerate(outs):
        if i:
            print("\n" + "-" * 40)
        print(prompt + text)


if __name__ == "__main__":
    main(sys.argv[1:])
