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
import subprocess
from pathlib import Path

import pytest

from conftest import JAX_CACHE_ENV
from readme_journey import readme
from readme_journey.commands import EXCLUDED, RUN
from readme_journey.files import HELLASWAG, LAMBADA, PROMPTS
from readme_journey.python_checks import PY_CHECKS
from readme_journey.readme import block_commands, shrunk
from readme_journey.runner import BIN, Journey, environment, once, shared_temp
from readme_journey.steps import JOURNEYED, README, SAMPLES, STEPS, TABLE, run_journey


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


@check("train mix")
def _(j: Journey, r: dict):
    records = trained(j.clone, "out/mix", r)
    val = [x for x in records if "val_loss" in x]
    assert all(x["val_bpb/web"] > 0 and x["val_bpb/notes"] > 0 for x in val), val
    assert any("epochs/notes" in x for x in records), records
    assert (j.clone / "out/mix/data/notes/meta.json").is_file() and not (j.clone / "out/mix/data/web").exists()


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


@check("eval mix")
def _(j: Journey, r: dict):
    # two tables: the held-out texts', then the sources' own validation splits' (--text=mix)
    tables = r["stdout"].split("\ntext ")[1:]
    assert len(tables) == 2, r["stdout"]
    for table in tables:
        rows = {line.split()[0]: line.split() for line in table.splitlines()
                if line.split()[:1] in (["web"], ["notes"], ["all"])}
        assert sorted(rows) == ["all", "notes", "web"], r["stdout"]
        bpb = {name: float(row[6]) for name, row in rows.items()}
        nbytes = {name: int(row[2].replace(",", "")) for name, row in rows.items()}
        assert nbytes["all"] == nbytes["web"] + nbytes["notes"] and min(bpb.values()) > 0, r["stdout"]
        weighted = (bpb["web"] * nbytes["web"] + bpb["notes"] * nbytes["notes"]) / nbytes["all"]
        assert bpb["all"] == pytest.approx(weighted, abs=1e-4), r["stdout"]  # the figures as printed, to 4 places
    assert "  web: shards/web" in tables[1] and "  notes: out/mix/data/notes" in tables[1], r["stdout"]


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


@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in STEPS])
def test_command(journey, name):
    if name.startswith("gptjax") and not (BIN / "gptjax").is_file():
        pytest.skip(f"no gptjax program in {BIN}: pip install -e . writes it")
    r = succeeded(journey, name)
    CHECKS[name](journey, r)


def test_every_step_has_its_check():
    assert sorted(CHECKS) == sorted(s.name for s in STEPS)


# ----------------------------------------------------------------------------- the README's Python


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


@pytest.mark.slow
@pytest.mark.parametrize("statement", list(dict.fromkeys(readme.statements(README))))
def test_python_statement(notebook, statement):
    recs, facts = notebook
    assert "error" not in facts, facts.get("error")
    PY_CHECKS[statement](recs[statement], recs, facts)


@pytest.mark.slow
def test_load_at_a_step(notebook):
    recs, facts = notebook
    assert facts["at_step_2"] == 2 and facts["step"] == 4, facts


@pytest.mark.slow
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
