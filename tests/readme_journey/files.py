"""What the README assumes a newcomer has beside the clone: their texts, prompts, held-out text, task files
and corpora, small and the same at every run."""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCABULARY = ("the a model reads every line of text and learns which word comes next so that it can write more of "
              "the same kind small tokens data train step loss falls slowly while batches pass through layers "
              "attention looks back over the context window each head sees its own part weights change by gradient "
              "descent until the validation figures stop improving river mountain garden window kitchen letter "
              "morning evening question answer story reader").split()
CODE = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nprint(fib(10))\n"
PROMPTS = ["def ", "import ", "class A"]
HELLASWAG = [
    {"ctx": "def add(a, b):\n    return", "endings": [" a + b", " None", " 7"], "label": 0},
    {"ctx": "import", "endings": [" os", " (", "["], "label": "0"},  # a label as a string of digits
    {"ctx": "for i in", "endings": [" range(3):", " 12", " )"], "label": 0},
]
LAMBADA = ["def fib(n):\n    return n", "import os\nimport sys", "for x in range(3):\n    print(x)"]


def prose(n: int, rng: random.Random) -> str:
    """About n words of sentences over a small vocabulary: enough pairs for a BPE of 512 to learn."""
    sentences, left = [], n
    while left > 0:
        k = min(left, rng.randint(5, 14))
        sentences.append(" ".join(rng.choice(VOCABULARY) for _ in range(k)).capitalize() + ".")
        left -= k
    return " ".join(sentences)


def jsonl_zst(path: Path, texts: list[str]) -> None:
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": t, "url": f"https://example.org/{i}"}) + "\n" for i, t in enumerate(texts))
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))


def make_files(clone: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(25)
    for i in range(12):  # my_texts/**/*.txt, two levels deep
        path = clone / "my_texts" / ("notes" if i % 2 else "notes/old") / f"note{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(prose(700, rng) + "\n")
    for part in range(2):
        jsonl_zst(clone / "web" / f"part-{part}.jsonl.zst", [prose(120, rng) for _ in range(60)])
    jsonl_zst(clone / "wiki" / "part-0.jsonl.zst", [prose(150, rng) for _ in range(6)])
    (clone / "fineweb").mkdir()  # the stand-in for FineWeb's downloaded parquet files
    pq.write_table(pa.table({"text": [prose(80, rng) for _ in range(240)]}), clone / "fineweb" / "part-0.parquet")
    (clone / "my.txt").write_text(prose(4000, rng) + "\n")
    (clone / "prompt.txt").write_text("def fib(n):\n")
    (clone / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (clone / "held_out.txt").write_text(CODE * 4)
    (clone / "hellaswag_val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in HELLASWAG))
    (clone / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    held_out = random.Random(26)  # a mixture's held-out text of each source, with a generator of its own
    jsonl_zst(clone / "held_out" / "web.jsonl.zst", [prose(120, held_out) for _ in range(4)])
    (clone / "held_out" / "notes").mkdir()
    (clone / "held_out" / "notes" / "note.txt").write_text(prose(700, held_out) + "\n")
