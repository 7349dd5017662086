"""Configuration as data: frozen dataclasses, TOML presets and `--section.key=value` overrides.

The dataclass defaults are the CPU default run (`python train.py` with no arguments);
`configs/cpu.toml` spells them out and a test keeps the two equal. A preset names a
section per table (`[model]`, `[data]`, `[train]`) and top-level keys for the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gptjax.errors import UserError


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = opt(4, "number of transformer blocks")
    n_head: int = opt(4, "attention heads per block")
    n_embd: int = opt(192, "model width (must be a multiple of n_head)")
    block_size: int = opt(128, "context length in tokens")
    vocab_size: int = opt(0, "vocabulary size; 0 takes the tokenizer's")
    pad_vocab_to: int = opt(64, "pad the embedding table to a multiple of this (padded ids are never predicted)")
    dropout: float = opt(0.0, "dropout rate in training")
    bias: bool = opt(True, "biases in linear layers and layer norms")
    pos_encoding: Literal["learned", "sincos"] = opt("learned", "position encoding: learned table (GPT-2) or fixed sine/cosine")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "compute dtype; parameters and softmax stay float32")

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "pad_vocab_to"):
            _check(getattr(self, name) >= 1, f"model.{name} must be at least 1, got {getattr(self, name)}.")
        _check(self.vocab_size >= 0, f"model.vocab_size must be 0 (the tokenizer's) or positive, got {self.vocab_size}.")
        _check(
            self.n_embd % self.n_head == 0,
            f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head}); "
            f"for example n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}.",
        )
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}.")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to
        return (self.vocab_size + m - 1) // m * m


@dataclass(frozen=True)
class DataConfig:
    corpus: str = opt("", "a text file, a folder or a glob; empty: the Python standard library's source")
    tokenizer: Literal["gpt2", "byte"] = opt("gpt2", "tokenizer: the GPT-2 BPE, or bytes for character-level models")
    val_fraction: float = opt(0.02, "share of the corpus held out for validation")
    dir: str = opt("", "where the token shards go; empty: <out_dir>/data")

    def __post_init__(self):
        _check(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}.")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = opt(8, "sequences per micro-batch, over all devices")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_steps: int = opt(500, "optimizer steps")
    lr: float = opt(2e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(40, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 turns clipping off")
    eval_interval: int = opt(100, "steps between validation evaluations")
    eval_batches: int = opt(8, "batches per validation evaluation")
    log_interval: int = opt(10, "steps between progress lines")
    ckpt_interval: int = opt(200, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = opt(3, "how many recent checkpoints to keep")
    seed: int = opt(0, "seed for initialisation, batches and dropout")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir")
    init_from: str = opt("", "fine-tune: start from these weights (a run directory or hf:DIR) and take their model shape")
    parallel: Literal["pmap", "fsdp"] = opt("pmap", "parallel strategy: pmap replicates the model on every device; "
                                            "fsdp shards parameters and optimizer state over them")
    devices: int = opt(0, "how many devices of each process to use; 0 uses all")
    loss_chunk: int = opt(2048, "tokens per cross-entropy chunk: the loss and its gradient are computed that many "
                               "tokens at a time, never holding the whole batch's logits; 0: all at once")
    remat: Literal["none", "block", "dots"] = opt("none", "recompute activations in the backward pass to save "
                                                  "memory: block keeps only each block's input, dots also its "
                                                  "matrix products; none keeps everything (fastest)")
    on_nonfinite: Literal["stop", "skip"] = opt("stop", "a NaN or infinite loss or gradient: stop the run, or skip that update")
    sample_tokens: int = opt(120, "tokens to sample at the end of training; 0 for none")

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                     "log_interval", "ckpt_interval", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"train.{name} must be at least 1, got {getattr(self, name)}.")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be 0 or more, got {self.warmup_steps}.")
        _check(self.lr > 0 and self.min_lr >= 0, f"train.lr must be positive and train.min_lr not negative, got {self.lr} and {self.min_lr}.")
        _check(self.grad_clip >= 0, f"train.grad_clip must be 0 (off) or positive, got {self.grad_clip}.")
        _check(self.loss_chunk >= 0, f"train.loss_chunk must be 0 (all at once) or more, got {self.loss_chunk}.")
        _check(self.sample_tokens >= 0, f"train.sample_tokens must be 0 or more, got {self.sample_tokens}.")


@dataclass(frozen=True)
class DistConfig:
    coordinator: str = opt("", "host:port of process 0, for processes started by hand; 'auto': let JAX detect the "
                               "cluster (SLURM, Open MPI, TPU pod); empty: one process, unless SLURM or Open MPI "
                               "started several")
    num_processes: int = opt(0, "how many processes in all (with --dist.coordinator=host:port)")
    process_id: int = opt(-1, "this process's index, 0 to num_processes - 1 (with --dist.coordinator=host:port)")
    timeout: int = opt(300, "seconds to wait for the coordinator and every process before giving up")

    def __post_init__(self):
        _check(self.timeout >= 1, f"dist.timeout must be at least 1 second, got {self.timeout}.")
        if self.coordinator in ("", "auto"):
            _check(self.coordinator == "auto" or (self.num_processes, self.process_id) == (0, -1),
                   "--dist.num_processes and --dist.process_id need --dist.coordinator=host:port (process 0's "
                   "address), or --dist.coordinator=auto on a cluster JAX detects.")
            return
        host, colon, port = self.coordinator.rpartition(":")
        _check(bool(host and colon) and port.isdigit() and 0 < int(port) < 65536,
               f"--dist.coordinator must be host:port (e.g. 10.0.0.1:1234), 'auto' or empty; got {self.coordinator!r}.")
        _check(self.num_processes >= 1, f"--dist.coordinator={self.coordinator} needs --dist.num_processes "
                                        f"(how many processes in all); got {self.num_processes}.")
        _check(0 <= self.process_id < self.num_processes,
               f"--dist.process_id must be this process's index, 0 to {self.num_processes - 1}; got {self.process_id}.")


@dataclass(frozen=True)
class Config:
    config: str = opt("", "a preset: a name in configs/ (cpu, char, gpt2-124m, …) or a path to a .toml file")
    out_dir: str = opt("out/run", "run directory: checkpoints, metrics, prepared data")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


@dataclass(frozen=True)
class SampleConfig:
    checkpoint: str = opt("out/run", "a run directory (its latest checkpoint) or one checkpoint step directory")
    step: int = opt(-1, "which checkpoint step to load; -1 for the latest")
    prompt: str = opt("", "the prompt; empty: --prompt_file, else standard input when it is not a terminal")
    prompt_file: str = opt("", "read the prompt from this file")
    num_samples: int = opt(1, "how many continuations to draw")
    max_new_tokens: int = opt(200, "tokens to generate per sample")
    temperature: float = opt(0.8, "softmax temperature; 0 is greedy")
    top_k: int = opt(200, "keep only the k most likely tokens; 0 keeps all")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set with this much probability")
    seed: int = opt(0, "sampling seed")
    stream: bool = opt(True, "print a single sample token by token as it is decoded, when standard output is a terminal")
    prompts_file: str = opt("", "many prompts: a text file with one prompt per line, or a .jsonl file with a "
                                "\"prompt\" field on each line")
    output: str = opt("", "write the samples to this JSONL file, one line each: prompt, completion and the controls")
    batch_size: int = opt(16, "prompts decoded together")

    def __post_init__(self):
        _check(self.num_samples >= 1, f"num_samples must be at least 1, got {self.num_samples}.")
        _check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}.")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        _check(self.temperature >= 0, f"temperature must be 0 (greedy) or positive, got {self.temperature}.")
        _check(self.top_k >= 0, f"top_k must be 0 (off) or positive, got {self.top_k}.")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}.")


# ----------------------------------------------------------------------------- flat keys


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def flat_fields(cls) -> dict[str, tuple[Any, Any, str]]:
    """Map 'section.key' (or 'key') to (type, default, help) for every leaf field of `cls`."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Any, Any, str]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            for key, spec in flat_fields(tp).items():
                out[f"{f.name}.{key}"] = spec
        else:
            out[f.name] = (tp, f.default, f.metadata.get("help", ""))
    return out


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return tp.__name__


def _convert(key: str, raw: Any, tp) -> Any:
    """Turn a string (command line) or a TOML value into a value of type `tp`, or say why not."""
    def bad(expected: str):
        return UserError(f"--{key} expects {expected}, got {raw!r}.")

    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if raw in choices:
            return raw
        hint = difflib.get_close_matches(str(raw), [str(c) for c in choices], n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise UserError(f"--{key} must be one of {', '.join(repr(c) for c in choices)}; got {raw!r}.{extra}")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise bad("true or false")
    if tp is int:
        if isinstance(raw, bool):
            raise bad("an integer")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).replace("_", ""))
        except ValueError:
            raise bad("an integer") from None
    if tp is float:
        if isinstance(raw, bool):
            raise bad("a number")
        if isinstance(raw, (int, float)):
            return float(raw)
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if tp is str:
        if isinstance(raw, (dict, list)):
            raise bad("a string")
        return str(raw)
    raise TypeError(f"unsupported config type {tp}")


def _unknown(key: str, valid: typing.Iterable[str], where: str) -> UserError:
    valid = sorted(valid)
    tail = key.rsplit(".", 1)[-1]
    # a right key in the wrong section first, then the closest spelling
    hint = [v for v in valid if v.rsplit(".", 1)[-1] == tail][:1] or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    suggestion = f" Did you mean --{hint[0]}?" if hint else ""
    return UserError(
        f"unknown option --{key}{where}.{suggestion} Valid options: {', '.join('--' + v for v in valid)}."
    )


def _nest(cls, flat: dict[str, Any]):
    """Build `cls` from flat 'section.key' values (missing ones keep their defaults)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            prefix = f.name + "."
            kwargs[f.name] = _nest(tp, {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)})
        elif f.name in flat:
            kwargs[f.name] = flat[f.name]
    return cls(**kwargs)


def to_flat(obj) -> dict[str, Any]:
    """The inverse of _nest: 'section.key' → value for every leaf field."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in to_flat(value).items()})
        else:
            out[f.name] = value
    return out


def from_dict(cls, tree: dict[str, Any], where: str = ""):
    """Build `cls` from a nested dict (a TOML document or a checkpoint's saved config), checking every key."""
    specs = flat_fields(cls)
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]):
        for k, v in node.items():
            key = prefix + k.replace("-", "_")
            if isinstance(v, dict) and any(s.startswith(key + ".") for s in specs):
                walk(key + ".", v)
            elif key in specs:
                flat[key] = _convert(key, v, specs[key][0])
            else:
                raise _unknown(key, specs, where)

    walk("", tree)
    return _nest(cls, flat)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------- presets


def presets_dir() -> Path:
    """configs/ beside the package (a source checkout), or inside it (an installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if candidate.is_dir():
            return candidate
    return here.parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    path = Path(name)
    if not (name.endswith(".toml") or os.sep in name):
        path = presets_dir() / f"{name}.toml"
    if not path.is_file():
        names = preset_names()
        hint = difflib.get_close_matches(name, names, n=1)
        raise UserError(
            f"no preset {name!r} (looked for {path}). Give a name from configs/ "
            f"({', '.join(names) or 'none found'}) or a path to a .toml file."
            + (f" Did you mean {hint[0]!r}?" if hint else "")
        )
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"preset {path} is not valid TOML: {e}.") from None


# ----------------------------------------------------------------------------- command line


def split_args(argv: list[str], specs: dict) -> tuple[dict[str, str], bool]:
    """Parse `--key=value`, `--key value` and bare `--flag` (booleans) into raw strings."""
    raw: dict[str, str] = {}
    want_help = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
            i += 1
            continue
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}: options look like --section.key=value (see --help).")
        body = arg[2:]
        key, eq, value = body.partition("=")
        key = key.replace("-", "_")
        if key not in specs:
            raise _unknown(key, specs, "")
        if not eq:
            if specs[key][0] is bool and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise UserError(f"--{key} needs a value ({_type_name(specs[key][0])}).")
        raw[key] = value
        i += 1
    return raw, want_help


def help_text(cls, prog: str, current=None, intro: str = "") -> str:
    current_flat = to_flat(current) if current is not None else {}
    lines = [f"usage: {prog} [--key=value ...]", ""]
    if intro:
        lines += [intro, ""]
    section = None
    for key, (tp, default, help) in flat_fields(cls).items():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            if head:
                lines.append(f"[{head}]")
        value = current_flat.get(key, default)
        lines.append(f"  --{key} ({_type_name(tp)}, default {value!r})")
        lines.append(f"      {help}")
    return "\n".join(lines)


def parse_args(argv: list[str], prog: str = "train.py", intro: str = "") -> Config:
    """Defaults, then the preset named by --config, then the other overrides, in that order."""
    specs = flat_fields(Config)
    raw, want_help = split_args(argv, specs)
    flat: dict[str, Any] = {}
    if raw.get("config"):
        preset = from_dict(Config, load_preset(raw["config"]), where=f" in preset {raw['config']!r}")
        flat.update(to_flat(preset))
    for key, value in raw.items():
        flat[key] = _convert(key, value, specs[key][0])
    cfg = _nest(Config, flat)
    if want_help:
        print(help_text(Config, prog, cfg, intro))
        raise SystemExit(0)
    return cfg


def parse_flat(cls, argv: list[str], prog: str, intro: str = ""):
    """Command-line parsing for a flat dataclass such as SampleConfig."""
    specs = flat_fields(cls)
    raw, want_help = split_args(argv, specs)
    if want_help:
        print(help_text(cls, prog, None, intro))
        raise SystemExit(0)
    return cls(**{k: _convert(k, v, specs[k][0]) for k, v in raw.items()})


def to_toml(obj) -> str:
    """Write a (nested) config as TOML: top-level keys first, then one table per section."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    tree = to_dict(obj)
    lines = [f"{k} = {fmt(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for k, v in tree.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {fmt(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
