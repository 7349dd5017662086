"""The journey through the README: its commands as steps (with what each waits for), in a folder like a
fresh clone, run once per test session, independent steps side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import JAX_CACHE_ENV, ROOT
from readme_journey import readme
from readme_journey.commands import RUN
from readme_journey.files import LAMBADA, make_files
from readme_journey.readme import shrunk
from readme_journey.runner import Step, environment, run_steps
from xla_flags import xla_flags

README = ROOT / "README.md"
NOTEBOOK = ROOT / "tests" / "readme_journey" / "notebook.py"
WORKERS = 3  # commands at once on 2 cores: much of each is one thread's start-up, tracing and compiling
TIMEOUT = 420


JOURNEYED: list[str] = []  # the README commands that the steps run


def run(name: str, *commands: str, after: tuple[str, ...] = (), env: dict | None = None) -> Step:
    """A step of README commands, in one shell, each with RUN's options appended."""
    JOURNEYED.extend(commands)
    return Step(name, "\n".join(shrunk(c, RUN[c]) for c in commands), after, env or {})


SAMPLES = [c for c in RUN if c.startswith(("python sample.py --checkpoint=out/run", "echo 'import os' |"))]
TWO_PROCESSES_SETUP = 'export XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=4" JAX_PLATFORMS=cpu'
TWO_PROCESSES = next(c for c in RUN if c.startswith("for i in 0 1; do\npython train.py --config=char"))
TABLE = readme.command_table(README)

# in order of priority: a free worker takes the first step whose predecessors are done
STEPS = [
    run("train", "python train.py"),
    # the README's export adds the device count to the flags already set: here the suite's, without a count
    run("two processes", TWO_PROCESSES_SETUP, TWO_PROCESSES, "python sample.py --checkpoint=out/two --prompt='def '",
        env={"XLA_FLAGS": xla_flags()}),
    run("train cpu-gpt2", "python train.py --config=cpu-gpt2 --out_dir=out/gpt2-arch"),
    Step("set-up: the gpt2 folder", "gptjax convert to-hf out/gpt2-arch gpt2", after=("train cpu-gpt2",)),
    run("from-hf", "gptjax convert from-hf gpt2 out/gpt2", after=("set-up: the gpt2 folder",)),
    run("fine-tune", "python train.py --train.init_from=out/gpt2 --data.corpus=my.txt --out_dir=out/tuned",
        after=("from-hf",)),
    *[run(f"sample {i}", c, after=("train",)) for i, c in enumerate(SAMPLES, 1)],
    Step("python blocks", f"python {NOTEBOOK} ../readme_python.json ../notebook.json", after=("train",)),
    run("eval text", "python -m gptjax.eval out/run --text=held_out.txt", after=("train",)),
    run("eval tasks", "python -m gptjax.eval out/run --task=hellaswag_val.jsonl,lambada.jsonl --output=eval.json",
        after=("train",)),
    # after every reader of out/run, so that each read the run of the first command
    run("resume", "python train.py --train.resume=true",
        after=("python blocks", "eval text", "eval tasks", *[f"sample {i}" for i in range(1, len(SAMPLES) + 1)])),
    run("train char", "python train.py --config=char --train.max_steps=200"),
    Step("plot", "gptjax plot out/run && gptjax plot out/run out/char --out=runs.png",
         after=("resume", "train char")),
    Step("gptjax plot", "gptjax plot out/run --out=by-gptjax.png", after=("resume",)),
    run("train mine", "python train.py --data.corpus='my_texts/**/*.txt' --out_dir=out/mine --model.n_layer=6"),
    run("prepare web", "python -m gptjax.data prepare --data.corpus='web/*.jsonl.zst' --data.dir=shards/web"),
    run("train web", "python train.py --data.dir=shards/web --out_dir=out/web", after=("prepare web",)),
    run("train mix", "python train.py --data.mix='web=shards/web:0.7,notes=my_texts:0.3' --out_dir=out/mix",
        after=("prepare web",)),
    run("eval mix", "python -m gptjax.eval out/mix --text='web=held_out/web.jsonl.zst,notes=held_out/notes'",
        "python -m gptjax.eval out/mix --text=mix", after=("train mix",)),
    run("sample hf:gpt2", "python sample.py --checkpoint=hf:gpt2 --prompt='The meaning of life is'",
        after=("set-up: the gpt2 folder",)),
    # the prose's `gptjax.load("hf:gpt2")`, which computes in float32 on every device, as transformers does
    Step("load hf:gpt2", "python -c 'import gptjax; m = gptjax.load(\"hf:gpt2\"); print(m.dtype, repr(m))'",
         after=("set-up: the gpt2 folder",)),
    run("eval hf:gpt2", "python -m gptjax.eval hf:gpt2 --text='wiki/*.jsonl.zst' --stride=512 --batch_size=16",
        after=("set-up: the gpt2 folder",)),
    run("to-hf", "gptjax convert to-hf out/tuned tuned-hf", after=("fine-tune",)),
    run("prepare fineweb",
        "python -m gptjax.data prepare --config=gpt2-124m --data.corpus='fineweb/*.parquet' --data.dir=shards/fineweb"),
    run("train fineweb", "python train.py --config=gpt2-124m --data.dir=shards/fineweb", after=("prepare fineweb",)),
    # gptjax.bench.memory asks for --train.devices simulated devices itself, unless XLA_FLAGS already names a count
# (the journey's flags without a device count)
    run("memory", "gptjax memory --config=gpt2-1.5b --train.devices=8", env={"XLA_FLAGS": xla_flags()}),
    run("memory remat", "gptjax memory --config=gpt2-1.5b --train.devices=8 --train.remat=block",
        env={"XLA_FLAGS": xla_flags()}),
    # the "One command" table: each row's help against the help of what it is the same as
    *[Step(f"{ours} --help", f"{ours} --help > ../help-{i}-ours.txt && {same} --help > ../help-{i}-same.txt")
      for i, (ours, same) in enumerate(TABLE)],
    Step("gptjax --help", "gptjax --help && python -m gptjax --help"),
]

# Run after the README's Python, in its namespace: the figures its statements' checks compare with
FOLLOW_UP = f"""
text = "def fib(n):\\n    return n"
facts["tokens"] = len(m.tokenizer.encode(text))
facts["logprobs_mean"] = float(m.logprobs(text).mean())
facts["bits_per_byte"] = float(-m.logprobs(text, from_start=True).sum() / len(text.encode()) / 0.6931471805599453)
facts["step"] = m.step
facts["at_step_2"] = gptjax.load("out/run", step=2).step
facts["model"] = {{k: getattr(m.config.model, k) for k in ("n_layer", "n_embd", "tie_embeddings", "pos_encoding")}}
facts["tokenizer"] = m.tokenizer.name
facts["dtype"] = m.dtype
facts["repr"] = repr(m)
facts["lambada"] = []
for t in {LAMBADA!r}:
    cut = max(t.rfind(" "), t.rfind("\\t"), t.rfind("\\n"))
    context, word = t[:cut], t[cut:]
    ids, n = m.tokenizer.encode(t), len(m.tokenizer.encode(word))
    facts["lambada"].append({{"sum": float(m.logprobs(t)[-n:].sum()),
                             "splits": ids == m.tokenizer.encode(context) + m.tokenizer.encode(word)}})
"""


def run_journey(root: Path) -> dict[str, dict]:
    clone = root / "clone"
    clone.mkdir(parents=True)
    for name in ("train.py", "sample.py"):
        shutil.copy(ROOT / name, clone / name)
    shutil.copytree(ROOT / "configs", clone / "configs")
    make_files(clone)
    (root / "home").mkdir()
    (root / "readme_python.json").write_text(json.dumps(
        {"blocks": readme.fenced_blocks(README.read_text(), "python"), "after": FOLLOW_UP}))
    return run_steps(STEPS, clone, environment(root / "home", JAX_CACHE_ENV), WORKERS, TIMEOUT)
