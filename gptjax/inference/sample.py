"""Sample continuations from a trained model: `gptjax sample` or `python sample.py` --checkpoint=out/run --prompt='def '.

The command-line front of gptjax.inference.pretrained. It lives in the package so that an installed gptjax has
it; the top-level sample.py runs it.
"""

import json
import re
import sys
from pathlib import Path

from gptjax import paths

from gptjax.runtime import disk
from gptjax.config import SampleConfig
from gptjax.options import parse_flat
from gptjax.errors import UserError, cli

INTRO = ("Sample continuations of a prompt from a checkpoint. The prompt comes from --prompt, --prompt_file or "
         "stdin; many prompts from --prompts_file, their samples to the terminal or to --output as JSONL.")


def _existing(name: str, option: str) -> Path:
    path = paths.expand(name)
    if not path.is_file():
        raise UserError(f"{option} {path} does not exist.")
    return path


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line, or in a .jsonl file the "prompt" field of each line's object."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.suffix != ".jsonl":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"line {n} of {path} is not JSON ({e.msg}); a .jsonl prompts file holds one object "
                                'per line, such as {"prompt": "def fib(n):"}.') from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UserError(f'line {n} of {path} has no "prompt" field holding a string: {line[:80]!r}.')
            prompts.append(record["prompt"])
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompts.")
    return prompts


def read_prompts(cfg: SampleConfig) -> list[str]:
    given = [name for name in ("prompt", "prompt_file", "prompts_file") if getattr(cfg, name)]
    if len(given) > 1:
        both = " and ".join("--" + g for g in given)
        raise UserError(f"give one of --prompt, --prompt_file and --prompts_file, not {both}.")
    if cfg.prompts_file:
        return read_prompts_file(_existing(cfg.prompts_file, "prompts file"))
    if cfg.prompt_file:
        return [_existing(cfg.prompt_file, "prompt file").read_text(encoding="utf-8", errors="replace")]
    if cfg.prompt:
        return [cfg.prompt]
    if not sys.stdin.isatty():
        return [sys.stdin.read()]
    return [""]


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def parse_stop(value: str) -> list[str]:
    """--stop: one string with \\n, \\t, \\r and \\\\ escapes, or a JSON list of strings."""
    if not value:
        return []
    if value.startswith("["):
        try:
            stops = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserError(f"--stop={value!r} starts like a JSON list but is not one ({e.msg}); give one string, "
                            'or a list such as --stop=\'["\\n\\n", "def "]\'.') from None
        if not (isinstance(stops, list) and stops and all(isinstance(s, str) and s for s in stops)):
            raise UserError(f"--stop={value!r}: a JSON list of stop strings must hold non-empty strings.")
        return stops
    return [re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], value)]


def warn_long(model, prompts: list[str]) -> None:
    block = model.config.model.block_size
    lengths = [len(ids) for ids in model.tokenizer.encode_batch(prompts)]
    long = [n for n in lengths if n > block]
    if len(prompts) == 1 and long:
        print(f"warning: the prompt has {long[0]} tokens, more than the context of {block}; "
              f"only its last {block} tokens are used.", file=sys.stderr)
    elif long:
        print(f"warning: {len(long)} of the {len(prompts)} prompts have more tokens than the context of {block}; "
              f"only their last {block} tokens are used.", file=sys.stderr)


@cli
def main(argv: list[str]) -> None:
    cfg = parse_flat(SampleConfig, argv, prog="sample.py", intro=INTRO)
    prompts = read_prompts(cfg)
    output = paths.expand(cfg.output) if cfg.output else None
    if output and not output.parent.is_dir():
        raise UserError(f"--output {cfg.output}: the folder {output.parent} does not exist.")
    stop = parse_stop(cfg.stop)
    from gptjax.inference.pretrained import load  # after the options: --help and bad input answer without JAX

    model = load(cfg.checkpoint, None if cfg.step < 0 else cfg.step, None if cfg.dtype == "checkpoint" else cfg.dtype)
    warn_long(model, prompts)
    controls = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                    top_p=cfg.top_p, seed=cfg.seed, stop=stop or None)

    if cfg.stream and sys.stdout.isatty() and len(prompts) == 1 and cfg.num_samples == 1 and not cfg.output:
        print(prompts[0], end="", flush=True)
        for piece in model.stream(prompts[0], **controls):
            print(piece, end="", flush=True)
        print()
        return

    rows = [p for p in prompts for _ in range(cfg.num_samples)]  # each row draws its own sample
    outs = model.generate(rows, batch_size=cfg.batch_size, **controls)
    if output:
        lines = [json.dumps({"prompt": prompt, "completion": text, "sample": i % cfg.num_samples, **controls,
                             "checkpoint": str(model.path), "step": model.step}, ensure_ascii=False) + "\n"
                 for i, (prompt, text) in enumerate(zip(rows, outs))]
        with disk.writing(output, "the samples", sum(len(line.encode()) for line in lines)):
            with open(output, "w", encoding="utf-8") as f:
                f.writelines(lines)
        print(f"wrote {len(outs)} samples of {len(prompts)} prompts to {output}")
        return
    for i, (prompt, text) in enumerate(zip(rows, outs)):
        if i:
            print("\n" + "-" * 40)
        print(prompt + text)


if __name__ == "__main__":
    main(sys.argv[1:])
