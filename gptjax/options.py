"""Configs on the command line and on disk: `--section.key=value` overrides, TOML presets, help.

Every option is a leaf field of the dataclasses in gptjax.config, named 'section.key' (or 'key'
for top-level fields). A preset (configs/NAME.toml) names a section per table; options on the
command line apply after it. Values are converted to the field's type; unknown keys and wrong
types are refused with the valid choices and the closest match.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from gptjax.config import Config
from gptjax.errors import UserError


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
    path = Path(name).expanduser()
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


def help_text(cls, prog: str, current=None, intro: str = "", keys=None) -> str:
    current_flat = to_flat(current) if current is not None else {}
    lines = [f"usage: {prog} [--key=value ...]", ""]
    if intro:
        lines += [intro, ""]
    section = None
    for key, (tp, default, help) in flat_fields(cls).items():
        if keys is not None and key not in keys:
            continue
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            if head:
                lines.append(f"[{head}]")
        value = current_flat.get(key, default)
        lines.append(f"  --{key} ({_type_name(tp)}, default {value!r})")
        lines.append(f"      {help}")
    return "\n".join(lines)


def parse_args(argv: list[str], prog: str = "train.py", intro: str = "", sections: tuple[str, ...] = (),
               default_preset: str = "") -> Config:
    """Defaults, then the preset named by --config (or `default_preset` without one; `--config=` for
    none), then the other overrides, in that order.

    `sections` limits the command line to those sections' options (and the top-level ones)."""
    specs = flat_fields(Config)
    if sections:
        specs = {k: v for k, v in specs.items() if "." not in k or k.split(".")[0] in sections}
    raw, want_help = split_args(argv, specs)
    raw.setdefault("config", default_preset)
    flat: dict[str, Any] = {}
    if raw["config"]:
        preset = from_dict(Config, load_preset(raw["config"]), where=f" in preset {raw['config']!r}")
        flat.update(to_flat(preset))
    for key, value in raw.items():
        flat[key] = _convert(key, value, specs[key][0])
    cfg = _nest(Config, flat)
    if want_help:
        print(help_text(Config, prog, cfg, intro, keys=specs))
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
    """Write a (nested) config as TOML: top-level keys first, then one table per section.

    A config holds only booleans, numbers and strings, so this is a few lines rather than a TOML
    library (tomli-w) among the dependencies. A JSON string is a TOML basic string, with every
    escape JSON writes (quotes, backslashes, newlines, other control characters as \\u00XX)
    valid in TOML; only DEL, which TOML also forbids raw, is escaped by hand.
    """
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        return repr(v)  # an int's or float's repr is valid TOML (3, 1e-05, inf, nan)

    tree = to_dict(obj)
    lines = [f"{k} = {fmt(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for k, v in tree.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {fmt(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
