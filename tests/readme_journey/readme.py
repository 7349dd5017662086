"""The commands and statements of README.md's fenced blocks, as the shell and Python read them."""

from __future__ import annotations

import ast
import re
from pathlib import Path


def strip_comment(line: str) -> str:
    """The line without a shell comment: a `#` that begins a word outside quotes, and what follows it."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


def block_commands(block: str) -> list[str]:
    """A ```bash block's commands: backslash-continued lines joined, comments and blank lines dropped; a
    `for ... done` loop is one command (its lines joined by newlines), and a block that is a script (#!) is one."""
    if block.startswith("#!"):
        return ["\n".join(line.rstrip() for line in block.splitlines() if line.strip())]
    logical: list[str] = []
    pending = ""
    for raw in block.splitlines():
        line = pending + (raw.strip() if pending else raw.rstrip())
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        line = strip_comment(line).strip()
        if line:
            logical.append(line)
    commands: list[str] = []
    loop: list[str] = []
    for line in logical:
        if loop or re.match(r"(for|while|until) ", line):
            loop.append(line)
            if re.match(r"done\b", line):
                commands.append("\n".join(loop))
                loop = []
        else:
            commands.append(line)
    assert not loop, f"a loop without its `done` in README.md: {loop}"
    return commands


def commands(readme: Path) -> list[str]:
    return [c for block in fenced_blocks(readme.read_text(), "bash") for c in block_commands(block)]


def statements(readme: Path) -> list[str]:
    """The ```python blocks' top-level statements, as ast.unparse writes them (comments dropped)."""
    blocks = fenced_blocks(readme.read_text(), "python")
    return [ast.unparse(node) for block in blocks for node in ast.parse(block).body]


def shrunk(command: str, options: str) -> str:
    """The command with `options` appended: to the last command of a line, or inside a loop before the `&`
    that puts each of its commands in the background."""
    if not options:
        return command
    if "\n" in command:
        lines = command.split("\n")
        at = next(i for i, line in enumerate(lines) if line.endswith(" &"))
        lines[at] = f"{lines[at][:-2]} {options} &"
        return "\n".join(lines)
    return f"{command} {options}"


def command_table(readme: Path) -> list[tuple[str, str]]:
    """The "One command" table's rows as (gptjax subcommand, the command it is the same as), placeholders
    (`[options]`, `RUN_DIR`, `...`, `a|b`) dropped."""
    section = readme.read_text().split("## One command", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(gptjax [^`]*)` \| `([^`]*)`", section, flags=re.M)

    def words(command: str) -> str:
        kept = []
        for word in command.split():
            if word.startswith("[") or "|" in word or "..." in word or word.isupper():
                break
            kept.append(word)
        return " ".join(kept)

    return [(words(a), words(b)) for a, b in rows]
