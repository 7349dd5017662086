"""The README is executable: every command of its ```bash blocks is run here as written, in a folder that
looks like a fresh clone to a newcomer, or excluded with the reason why CI cannot run it.

A command runs through `bash -c` exactly as the README writes it, then with options appended that shrink it
(a tiny model, a few steps): the last value of an option wins, so the README's own values are overridden,
never edited. The ```python blocks run statement by statement, as in a notebook (readme_journey/notebook.py),
and each statement's value is checked. The journey runs once per session (the workers of pytest -n share it),
its independent commands side by side, and each command is a test of its own, so a failure names it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import JAX_CACHE_ENV, ROOT
from readme_journey import readme
from readme_journey.files import HELLASWAG, LAMBADA, PROMPTS, make_files
from readme_journey.readme import block_commands, shrunk
from readme_journey.runner import BIN, Journey, Step, environment, once, run_steps, shared_temp

README = ROOT / "README.md"
NOTEBOOK = ROOT / "tests" / "readme_journey" / "notebook.py"
WORKERS = 3  # commands at once on 2 cores: much of each is one thread's start-up, tracing and compiling
TIMEOUT = 420

# ----------------------------------------------------------------------------- the README's commands

# Shrinking options: a model of one layer of width 32, a few steps; a BPE of 512 where the preset learns one
TINY = "--model.n_layer=1 --model.n_head=2 --model.n_embd=32 --model.block_size=32"
FEW_STEPS = ("--train.batch_size=4 --train.max_steps=4 --train.eval_interval=2 --train.eval_batches=1 "
             "--train.ckpt_interval=2 --train.log_interval=2 --train.sample_tokens=8")
TRAIN = f"{TINY} {FEW_STEPS}"
TRAIN_BPE = f"{TRAIN} --data.bpe_vocab=512"
SAMPLE = "--max_new_tokens=16"

# README command -> the options appended to it, each run by the journey below
RUN = {
    "python train.py": TRAIN_BPE,
    "python train.py --config=char --train.max_steps=200": TRAIN,
    "python train.py --data.corpus='my_texts/**/*.txt' --out_dir=out/mine --model.n_layer=6": TRAIN_BPE,
    "python -m gptjax.data prepare --data.corpus='web/*.jsonl.zst' --data.dir=shards/web": "--data.bpe_vocab=512",
    "python train.py --config=cpu-gpt2 --out_dir=out/gpt2-arch": TRAIN,
    "python train.py --data.dir=shards/web --out_dir=out/web": TRAIN_BPE,
    "python train.py --train.resume=true": f"{TRAIN_BPE} --train.max_steps=6",
    "python sample.py --checkpoint=out/run --prompt='def fib(n):' --max_new_tokens=100": SAMPLE,
    "python sample.py --checkpoint=out/run --num_samples=3 --temperature=0.9 --top_k=50 --top_p=0.95 --seed=1": SAMPLE,
    "echo 'import os' | python sample.py --checkpoint=out/run": SAMPLE,
    "python sample.py --checkpoint=out/run --prompt_file=prompt.txt --temperature=0": SAMPLE,
    "python sample.py --checkpoint=out/run --prompts_file=prompts.jsonl --output=samples.jsonl --num_samples=2": SAMPLE,
    r"python sample.py --checkpoint=out/run --prompt='def fib(n):' --stop='\n\n'": SAMPLE,
    # the local stand-in for the downloaded FineWeb parquet files, in GPT-2's tokenizer; the preset's model
    # trained at the tiny shape, since the run's point here is reading shards prepared apart
    "python -m gptjax.data prepare --config=gpt2-124m --data.corpus='fineweb/*.parquet' --data.dir=shards/fineweb": "",
    "python train.py --config=gpt2-124m --data.dir=shards/fineweb": f"{TRAIN} --train.grad_accum=1",
    "python -m gptjax.weights.convert from-hf gpt2 out/gpt2": "",
    "python sample.py --checkpoint=hf:gpt2 --prompt='The meaning of life is'": SAMPLE,
    # the source's model shape: only training options are appended
    "python train.py --train.init_from=out/gpt2 --data.corpus=my.txt --out_dir=out/tuned": FEW_STEPS,
    "python -m gptjax.weights.convert to-hf out/tuned tuned-hf": "",
    "python -m gptjax.eval out/run --text=held_out.txt": "",
    # the gpt2 folder here is the tiny cpu-gpt2 run's, of a 32-token context
    "python -m gptjax.eval hf:gpt2 --text='wiki/*.jsonl.zst' --stride=512 --batch_size=16": "--stride=16",
    "python -m gptjax.eval out/run --task=hellaswag_val.jsonl,lambada.jsonl --output=eval.json": "",
    "python -m gptjax.bench.memory --config=gpt2-1.5b --train.devices=8": f"{TINY} --train.batch_size=8 --train.grad_accum=1",
    "python -m gptjax.bench.memory --config=gpt2-1.5b --train.devices=8 --train.remat=block":
        f"{TINY} --train.batch_size=8 --train.grad_accum=1",
    "export XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu": "",
    "for i in 0 1; do\npython train.py --config=char --out_dir=out/two --train.max_steps=30 "
    "--dist.coordinator=127.0.0.1:12355 --dist.num_processes=2 --dist.process_id=$i &\ndone; wait":
        f"{TINY} --train.batch_size=8 --train.max_steps=2 --train.eval_interval=2 --train.eval_batches=1 "
        "--train.sample_tokens=0",
    "python sample.py --checkpoint=out/two --prompt='def '": SAMPLE,
}

BENCHMARK = "a benchmark: it measures for minutes by design (tests/bench/test_bench.py checks its arms' options only)"
EXCLUDED = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python train.py":
        "set-up: creates a virtual environment and installs gptjax, as .ci/run does on a fresh clone before the "
        "suite; its last command, python train.py, is the quick tour's first, run here",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest':
        "set-up and the test command itself: .ci/run creates the environment, installs gptjax and runs this suite",
    "python -m gptjax.bench quality --budget 150 --arms gpt2,rope,rmsnorm,qk_norm,relu2,swiglu": BENCHMARK,
    'python -m gptjax.bench quality --budget 150 --arms "gpt2,untied,no_bias,gqa,muon,bpe8k,cpu:" --half': BENCHMARK,
    "lm_eval --model gptjax --model_args path=out/run --tasks hellaswag,lambada_openai --batch_size 16":
        "a download: the harness fetches HellaSwag's and LAMBADA's data from the Hugging Face hub "
        "(tests/eval/test_harness.py runs lm_eval --model gptjax offline on local tasks)",
    "lm_eval --model gptjax --model_args path=hf:gpt2,stride=512 --tasks wikitext":
        "a download: the harness fetches WikiText from the Hugging Face hub",
    "python train.py --train.wandb=my-gpts --train.wandb_tags=stdlib,cpu --out_dir=out/stdlib":
        "a W&B login: without one W&B refuses to start the run; offline mode is WANDB_MODE=offline, an environment "
        "variable rather than an appended option (tests/train/test_run_logs.py trains into an offline W&B run and reads "
        "it back)",
    "python train.py --config=gpt2-124m": "a GPU or TPU: GPT-2 124M at half a million tokens a step, pmap over "
                                          "every local accelerator",
    "python train.py --config=gpt2-1.5b --train.parallel=fsdp": "a GPU or TPU: GPT-2 1.5B sharded over 8 GPUs",
    "#!/bin/bash\n#SBATCH --nodes=4 --ntasks-per-node=8 --gpus-per-node=8\n"
    "srun python train.py --config=gpt2-1.5b --train.parallel=fsdp --out_dir=/shared/runs/gpt2-xl":
        "a SLURM cluster: an sbatch script of 4 nodes x 8 GPUs under srun",
    'gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all --command="cd gptjax && '
    ".venv/bin/python train.py --config=gpt2-1.5b --train.parallel=fsdp --dist.coordinator=auto "
    '--out_dir=/mnt/shared/gpt2-xl"': "a TPU pod: gcloud runs the command on every worker of the pod",
    "export XLA_FLAGS=--xla_force_host_platform_device_count=4":
        "the set-up of the GPT-2 350M memory measurement that follows it",
    "for i in 0 1; do\n/usr/bin/time -v -o p$i.time python train.py --config=gpt2-350m --train.parallel=fsdp "
    "--model.scan_layers=true --train.remat=block --model.block_size=256 --train.batch_size=8 --train.grad_accum=1 "
    "--model.dtype=float32 --data.tokenizer=byte --model.vocab_size=50304 --data.corpus=CORPUS --out_dir=out/m350 "
    "--train.max_steps=2 --train.ckpt_interval=1000 --train.eval_batches=1 --train.sample_tokens=0 "
    "--dist.timeout=1800 --dist.coordinator=127.0.0.1:29517 --dist.num_processes=2 --dist.process_id=$i &\n"
    "done; wait": "a benchmark: the resident memory of two processes training GPT-2 350M (5 GB each, minutes on "
                  "2 cores) on a CORPUS the reader picks, measured by /usr/bin/time",
}


def test_every_readme_command_is_run_or_excluded():
    commands = readme.commands(README)
    assert commands, "found no ```bash block in README.md"
    unknown = [c for c in commands if c not in RUN and c not in EXCLUDED]
    assert not unknown, ("README commands that this test neither runs nor excludes (add each to RUN with the "
                         "options that shrink it, or to EXCLUDED with the reason):\n" + "\n".join(unknown))
    gone = [c for c in [*RUN, *EXCLUDED] if c not in commands]
    assert not gone, "entries of RUN/EXCLUDED that README.md no longer holds (update them):\n" + "\n".join(gone)
    assert not set(RUN) & set(EXCLUDED)
    assert all(reason.strip() for reason in EXCLUDED.values())


def test_every_run_command_is_in_the_journey():
    assert sorted(JOURNEYED) == sorted(RUN) and len(JOURNEYED) == len(set(JOURNEYED))


def test_the_command_parser():
    block = ("python a.py --x='#not' \\\n  --y=2   # a comment\n# a line of comment\n\n"
             "for i in 0 1; do\n  b --n=$i &\ndone; wait  # all\necho \"a # b\"  # c\n")
    assert block_commands(block) == ["python a.py --x='#not' --y=2", "for i in 0 1; do\nb --n=$i &\ndone; wait",
                                     'echo "a # b"']
    assert block_commands("#!/bin/bash\n#SBATCH --n=1\nsrun x\n") == ["#!/bin/bash\n#SBATCH --n=1\nsrun x"]
    loop = "for i in 0 1; do\nb --n=$i &\ndone; wait"
    assert shrunk(loop, "--m=1") == "for i in 0 1; do\nb --n=$i --m=1 &\ndone; wait"
    assert shrunk("echo x | python s.py", "--m=1") == "echo x | python s.py --m=1"


# ----------------------------------------------------------------------------- the journey

JOURNEYED: list[str] = []  # the README commands that the steps run


def run(name: str, *commands: str, after: tuple[str, ...] = (), env: dict | None = None) -> Step:
    """A step of README commands, in one shell, each with RUN's options appended."""
    JOURNEYED.extend(commands)
    return Step(name, "\n".join(shrunk(c, RUN[c]) for c in commands), after, env or {})


SAMPLES = [c for c in RUN if c.startswith(("python sample.py --checkpoint=out/run", "echo 'import os' |"))]
TWO_PROCESSES = next(c for c in RUN if c.startswith("for i in 0 1; do\npython train.py --config=char"))
TABLE = readme.command_table(README)

# in order of priority: a free worker takes the first step whose predecessors are done
STEPS = [
    run("train", "python train.py"),
    run("two processes", "export XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu", TWO_PROCESSES,
        "python sample.py --checkpoint=out/two --prompt='def '"),
    run("train cpu-gpt2", "python train.py --config=cpu-gpt2 --out_dir=out/gpt2-arch"),
    Step("set-up: the gpt2 folder", "python -m gptjax.weights.convert to-hf out/gpt2-arch gpt2", after=("train cpu-gpt2",)),
    run("from-hf", "python -m gptjax.weights.convert from-hf gpt2 out/gpt2", after=("set-up: the gpt2 folder",)),
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
    Step("plot", "python -m gptjax.train.plot out/run && python -m gptjax.train.plot out/run out/char --out=runs.png",
         after=("resume", "train char")),
    Step("gptjax plot", "gptjax plot out/run --out=by-gptjax.png", after=("resume",)),
    run("train mine", "python train.py --data.corpus='my_texts/**/*.txt' --out_dir=out/mine --model.n_layer=6"),
    run("prepare web", "python -m gptjax.data prepare --data.corpus='web/*.jsonl.zst' --data.dir=shards/web"),
    run("train web", "python train.py --data.dir=shards/web --out_dir=out/web", after=("prepare web",)),
    run("sample hf:gpt2", "python sample.py --checkpoint=hf:gpt2 --prompt='The meaning of life is'",
        after=("set-up: the gpt2 folder",)),
    # the prose's `gptjax.load("hf:gpt2")`, which computes in float32 on every device, as transformers does
    Step("load hf:gpt2", "python -c 'import gptjax; m = gptjax.load(\"hf:gpt2\"); print(m.dtype, repr(m))'",
         after=("set-up: the gpt2 folder",)),
    run("eval hf:gpt2", "python -m gptjax.eval hf:gpt2 --text='wiki/*.jsonl.zst' --stride=512 --batch_size=16",
        after=("set-up: the gpt2 folder",)),
    run("to-hf", "python -m gptjax.weights.convert to-hf out/tuned tuned-hf", after=("fine-tune",)),
    run("prepare fineweb",
        "python -m gptjax.data prepare --config=gpt2-124m --data.corpus='fineweb/*.parquet' --data.dir=shards/fineweb"),
    run("train fineweb", "python train.py --config=gpt2-124m --data.dir=shards/fineweb", after=("prepare fineweb",)),
    # gptjax.bench.memory asks for --train.devices simulated devices itself, unless XLA_FLAGS already names a count
    run("memory", "python -m gptjax.bench.memory --config=gpt2-1.5b --train.devices=8", env={"XLA_FLAGS": None}),
    run("memory remat", "python -m gptjax.bench.memory --config=gpt2-1.5b --train.devices=8 --train.remat=block",
        env={"XLA_FLAGS": None}),
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


@pytest.fixture(scope="session")
def journey(tmp_path_factory) -> Journey:
    return once(shared_temp(tmp_path_factory.getbasetemp()), run_journey)


def output(result: dict) -> str:
    return result.get("stdout", "") + result.get("stderr", "")


def succeeded(journey: Journey, name: str) -> dict:
    r = journey.results[name]
    assert r["rc"] != "skipped", f"{name}: not run, since {r.get('skipped')}:\n{r['script']}"
    where = f"{name}: `{r['script']}` (exit status {r['rc']}, {r.get('seconds')} s) printed:\n{output(r)[-6000:]}"
    assert r["rc"] == 0, where
    assert "Traceback" not in output(r), where
    return r


# ----------------------------------------------------------------------------- what each step must show

CHECKS = {}


def check(*names):
    def register(fn):
        for name in names:
            CHECKS[name] = fn
        return fn
    return register


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def trained(clone: Path, out: str, r: dict, steps: int = 4) -> list[dict]:
    """A run directory of `steps` steps: its checkpoints, config, metrics with finite validation figures, and
    the progress lines and final sample that train.py prints."""
    run_dir = clone / out
    assert (run_dir / "config.toml").is_file() and steps in checkpoints(run_dir), checkpoints(run_dir)
    records = metrics(run_dir)
    val = [x for x in records if "val_loss" in x]
    assert val and all(math.isfinite(x["val_loss"]) and math.isfinite(x["val_bpb"]) and x["val_bpb"] > 0
                       for x in val), val
    assert f"done: {steps} steps" in r["stdout"], output(r)
    return records


@check("train")
def _(j: Journey, r: dict):
    trained(j.clone, "out/run", r)  # and later resumed to step 6 (the resume step)
    assert {2, 4} <= set(checkpoints(j.clone / "out/run"))
    config = (j.clone / "out/run/config.toml").read_text()
    # the default preset is the one trained, at the tiny shape: untied, rotary, Muon, a learned BPE
    for setting in ('tie_embeddings = false', 'pos_encoding = "rope"', 'optimizer = "muon"', 'tokenizer = "bpe"',
                    'n_layer = 1', 'corpus = ""'):
        assert setting in config, (setting, config)
    assert (j.clone / "out/run/data/tokenizer.tiktoken").is_file()
    assert "bpe vocabulary 513" in r["stdout"] and "sample:" in r["stdout"], r["stdout"]


@check("resume")
def _(j: Journey, r: dict):
    trained(j.clone, "out/run", r, steps=6)
    assert "resume: continuing from step 4" in output(r), output(r)
    assert checkpoints(j.clone / "out/run") == [2, 4, 6]


@check("train char", "train mine", "train web", "train fineweb", "train cpu-gpt2", "fine-tune")
def _(j: Journey, r: dict):
    out = {"train char": "out/char", "train mine": "out/mine", "train web": "out/web",
           "train cpu-gpt2": "out/gpt2-arch", "train fineweb": "out/gpt2-124m", "fine-tune": "out/tuned"}
    name = r["name"]
    trained(j.clone, out[name], r)
    config = (j.clone / out[name] / "config.toml").read_text()
    if name == "train web":  # the shards as they were prepared, not a corpus of its own
        assert "in shards/web (prepared from web/*.jsonl.zst)" in r["stdout"], r["stdout"]
        assert not (j.clone / "out/web/data").exists()
    if name == "fine-tune":
        assert 'tokenizer = "gpt2"' in config and "init_from" in config, config


@check("prepare web", "prepare fineweb")
def _(j: Journey, r: dict):
    shards = j.clone / ("shards/web" if r["name"] == "prepare web" else "shards/fineweb")
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0, meta
    assert (shards / "train.bin").stat().st_size > 0
    assert meta["tokenizer"] == ("bpe" if r["name"] == "prepare web" else "gpt2"), meta


def printed_sample(r: dict, prompt: str) -> str:
    assert prompt in r["stdout"], r["stdout"]
    return r["stdout"].split(prompt, 1)[1]


@check(*[f"sample {i}" for i in range(1, len(SAMPLES) + 1)])
def _(j: Journey, r: dict):
    line = r["script"]
    if "--prompts_file" in line:
        samples = [json.loads(x) for x in (j.clone / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == len(PROMPTS) * 2 and {s["prompt"] for s in samples} == set(PROMPTS), samples
        assert all(isinstance(s["completion"], str) for s in samples)
    elif "--num_samples=3" in line:
        assert len(re.findall(r"^-{10,}$", r["stdout"], flags=re.M)) == 2, r["stdout"]  # three samples, two rules
    elif line.startswith("echo"):
        printed_sample(r, "import os")
    elif "--prompt_file" in line:
        printed_sample(r, "def fib(n):\n")
    elif "--stop" in line:
        assert "\n\n" not in printed_sample(r, "def fib(n):").rstrip("\n"), r["stdout"]
    else:
        assert len(printed_sample(r, "def fib(n):")) > 0


EVAL_LINE = re.compile(r"loss (\S+) \| perplexity (\S+) \| bits per byte (\S+)")


def eval_figures(r: dict) -> tuple[float, float, float]:
    found = EVAL_LINE.search(r["stdout"])
    assert found, r["stdout"]
    loss, ppl, bpb = map(float, found.groups())
    assert all(map(math.isfinite, (loss, ppl, bpb))) and loss > 0 and bpb > 0, found.group(0)
    assert ppl == pytest.approx(math.exp(loss), rel=2e-3), found.group(0)
    return loss, ppl, bpb


@check("eval text", "eval hf:gpt2")
def _(j: Journey, r: dict):
    eval_figures(r)
    assert re.search(r"^evaluating Pretrained\(.*, (float32|bfloat16) compute\)", r["stdout"], flags=re.M), r["stdout"]
    if "hf:gpt2" in r["script"]:
        assert "float32 compute" in r["stdout"] and "every 16" in r["stdout"], r["stdout"]


@check("eval tasks")
def _(j: Journey, r: dict):
    report = json.loads((j.clone / "eval.json").read_text())
    assert report["step"] == 4 and report["compute_dtype"] in ("float32", "bfloat16"), report
    hellaswag, lambada = report["tasks"]["hellaswag_val"], report["tasks"]["lambada"]
    assert hellaswag["examples"] == len(HELLASWAG), hellaswag
    assert 0 <= hellaswag["acc"] <= 1 and 0 <= hellaswag["acc_norm"] <= 1, hellaswag
    assert lambada["examples"] == len(LAMBADA) and math.isfinite(lambada["perplexity"]) and lambada["perplexity"] > 1
    assert "task hellaswag_val" in r["stdout"] and "task lambada" in r["stdout"] and "wrote eval.json" in r["stdout"]


@check("from-hf")
def _(j: Journey, r: dict):
    assert checkpoints(j.clone / "out/gpt2") == [0] and "wrote" in r["stdout"], r["stdout"]


@check("set-up: the gpt2 folder", "to-hf")
def _(j: Journey, r: dict):
    folder = j.clone / ("gpt2" if "gpt2-arch" in r["script"] else "tuned-hf")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").stat().st_size > 0
    if folder.name == "tuned-hf" and importlib.util.find_spec("transformers"):  # a folder transformers loads
        load = ("from transformers import GPT2LMHeadModel; "
                "c = GPT2LMHeadModel.from_pretrained('tuned-hf').config; print(c.n_layer, c.n_positions)")
        proc = subprocess.run(["python", "-c", load], cwd=j.clone, env=environment(j.root / "home", JAX_CACHE_ENV),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.split() == ["1", "32"], proc.stdout + proc.stderr


@check("load hf:gpt2")
def _(j: Journey, r: dict):
    assert r["stdout"].startswith("float32 Pretrained(") and "float32 compute" in r["stdout"], r["stdout"]


@check("sample hf:gpt2")
def _(j: Journey, r: dict):
    printed_sample(r, "The meaning of life is")


@check("two processes")
def _(j: Journey, r: dict):
    assert 2 in checkpoints(j.clone / "out/two") and "8 cpu devices" in r["stdout"] + r["stderr"], output(r)
    assert "done: 2 steps" in r["stdout"], r["stdout"]
    printed_sample(r, "def ")


@check("memory", "memory remat")
def _(j: Journey, r: dict):
    found = re.search(r"^parameters \+ optimizer state +(\S+) +(\S+)", r["stdout"], flags=re.M)
    assert "on 8 cpu devices" in r["stdout"] and found, r["stdout"]
    pmap, fsdp = map(float, found.groups())
    assert 0 < fsdp < pmap, found.group(0)  # fsdp splits the state over the devices, pmap copies it


@check("plot", "gptjax plot")
def _(j: Journey, r: dict):
    for png in ((j.clone / "out/run/loss.png", j.clone / "runs.png") if r["script"].startswith("python")
                else (j.clone / "by-gptjax.png",)):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png


@check("python blocks")
def _(j: Journey, r: dict):
    assert (j.root / "notebook.json").is_file()  # each statement: test_python_statement


@check("gptjax --help")
def _(j: Journey, r: dict):
    ours, direct = r["stdout"].split("usage: gptjax", 2)[1:]
    for name in ("train", "sample", "data", "convert", "bench", "plot", "eval", "memory"):
        assert f"\n  {name} " in ours and "not available" not in ours, ours
    assert ours == direct


for _i, (_ours, _same) in enumerate(TABLE):
    @check(f"{_ours} --help")
    def _(j: Journey, r: dict, i=_i):
        ours, same = ((j.root / f"help-{i}-{who}.txt").read_text() for who in ("ours", "same"))
        assert ours.strip() and ours == same, (ours, same)


@pytest.mark.parametrize("name", [s.name for s in STEPS])
def test_command(journey, name):
    if name.startswith("gptjax") and not (BIN / "gptjax").is_file():
        pytest.skip(f"no gptjax program in {BIN}: pip install -e . writes it")
    r = succeeded(journey, name)
    CHECKS[name](journey, r)


def test_every_step_has_its_check():
    assert sorted(CHECKS) == sorted(s.name for s in STEPS)


# ----------------------------------------------------------------------------- the README's Python


def value(record: dict) -> dict:
    assert "error" not in record, record["error"]
    return record["value"]


def _generate(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "str" and v["value"], v
    if "stop=" in rec["statement"]:
        assert "\n\n" not in v["value"] and "def " not in v["value"], v


def _generate_list(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "list" and [x["type"] for x in v["items"]] == ["str", "str"], v


def _stream(rec, recs, facts):
    assert "error" not in rec, rec["error"]
    once = recs["m.generate('def fib(n):', max_new_tokens=50)"]
    assert rec["printed"] and rec["printed"] == value(once)["value"], (rec["printed"], once)


def _logprobs(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "ndarray" and v["dtype"] in ("float32", "float64") and v["finite"], v
    assert v["shape"] == [facts["tokens"] - 1] and v["max"] <= 0, (v, facts)


def _perplexity(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "float" and v["finite"] and v["value"] > 1, v
    assert v["value"] == pytest.approx(math.exp(-facts["logprobs_mean"]), rel=1e-5)


def _bits_per_byte(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "float" and v["finite"] and v["value"] > 0, v
    assert v["value"] == pytest.approx(facts["bits_per_byte"], rel=1e-5)  # every token, the first after EOT


def _attributes(rec, recs, facts):
    config, tokenizer, params = value(rec)["items"]
    assert config["type"] == "Config" and tokenizer["type"] == "Tokenizer", (config, tokenizer)
    assert params["type"] == "dict" and params["leaves"] == params["array_leaves"] > 0, params
    # the default preset's untied output layer, at the tiny shape the journey trained
    assert facts["model"] == {"n_layer": 1, "n_embd": 32, "tie_embeddings": False, "pos_encoding": "rope"}, facts
    assert facts["tokenizer"] == "bpe"


def _dtype(rec, recs, facts):
    assert value(rec) in ({"type": "str", "value": "float32"}, {"type": "str", "value": "bfloat16"})
    assert f"{value(rec)['value']} compute" in facts["repr"], facts["repr"]


def _ran(rec, recs, facts):
    assert "error" not in rec, rec["error"]


# each statement of the README's ```python blocks, as ast.unparse writes it -> its check
PY_CHECKS = {
    "import gptjax": _ran,
    "m = gptjax.load('out/run')": _ran,
    "m.generate('def fib(n):', max_new_tokens=50)": _generate,
    "m.generate(['import ', 'class '], max_new_tokens=20, temperature=0)": _generate_list,
    "m.generate('def fib(n):', stop=['\\n\\n', 'def '])": _generate,
    "for piece in m.stream('def fib(n):', max_new_tokens=50):\n    print(piece, end='', flush=True)": _stream,
    "m.logprobs('def fib(n):\\n    return n')": _logprobs,
    "m.perplexity('def fib(n):\\n    return n')": _perplexity,
    "(m.config, m.tokenizer, m.params)": _attributes,
    "m.dtype": _dtype,
    "m.bits_per_byte('def fib(n):\\n    return n')": _bits_per_byte,
}


def test_every_python_statement_is_checked():
    statements = readme.statements(README)
    unchecked = [s for s in statements if s not in PY_CHECKS]
    assert not unchecked, "README Python statements without a check in PY_CHECKS:\n" + "\n".join(unchecked)
    gone = [s for s in PY_CHECKS if s not in statements]
    assert not gone, "PY_CHECKS entries that README.md no longer holds:\n" + "\n".join(gone)


@pytest.fixture(scope="session")
def notebook(journey):
    """Each statement's record and the follow-up's facts; a statement that raised fails its own test."""
    r = journey.results["python blocks"]
    assert r["rc"] != "skipped", f"the Python blocks did not run, since {r.get('skipped')}"
    assert (journey.root / "notebook.json").is_file(), output(r)
    got = json.loads((journey.root / "notebook.json").read_text())
    return {r["statement"]: r for r in got["records"]}, got["facts"]


@pytest.mark.parametrize("statement", list(dict.fromkeys(readme.statements(README))))
def test_python_statement(notebook, statement):
    recs, facts = notebook
    assert "error" not in facts, facts.get("error")
    PY_CHECKS[statement](recs[statement], recs, facts)


def test_load_at_a_step(notebook):
    recs, facts = notebook
    assert facts["at_step_2"] == 2 and facts["step"] == 4, facts


def test_eval_scores_tasks_as_the_notebook_does(journey, notebook):
    """eval's last-word perplexity against the same log-likelihoods from gptjax.load().logprobs: the same
    output layer (the cpu preset's untied one) in both."""
    recs, facts = notebook
    succeeded(journey, "eval tasks")
    report = json.loads((journey.clone / "eval.json").read_text())
    assert all(x["splits"] for x in facts["lambada"]), facts["lambada"]
    expected = math.exp(-sum(x["sum"] for x in facts["lambada"]) / len(facts["lambada"]))
    tolerance = 1e-4 if report["compute_dtype"] == facts["dtype"] == "float32" else 2e-2
    assert report["tasks"]["lambada"]["perplexity"] == pytest.approx(expected, rel=tolerance)
