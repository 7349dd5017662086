"""train.py and sample.py as a person runs them: real subprocesses, real exit codes and messages (sample.py's
file and option handling also in this process, where a process of its own adds nothing)."""

import json
import os
import pty
import subprocess
import sys

import pytest

from conftest import JAX_CACHE_ENV, ROOT
from xla_flags import xla_flags

pytestmark = pytest.mark.slow  # every test here starts processes of its own

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--data.tokenizer=byte", "--data.val_fraction=0.1", "--train.batch_size=8", "--train.eval_batches=2",
        "--train.log_interval=5", "--train.warmup_steps=2", "--train.lr=3e-3"]


def run(script, *args, stdin=None, env_devices=1):
    env = {"XLA_FLAGS": xla_flags(env_devices), "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", **JAX_CACHE_ENV}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          input=stdin, cwd=ROOT, env=env, timeout=300)


def run_in_terminal(script, *args) -> tuple[int, str]:
    """Run with standard output on a pseudo-terminal, as in a person's shell; return the code and the output."""
    env = {"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           **JAX_CACHE_ENV}
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], stdout=follower,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the process has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode().replace("\r\n", "\n")


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def sample_here(capsys, *args) -> tuple[str, str]:
    """sample.py's main in this process, for the checks where a process of its own adds nothing (its
    exit codes and messages, a terminal, standard input: real processes, above and below); its output."""
    from gptjax.inference.sample import main

    capsys.readouterr()
    main([*map(str, args)])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_train_then_sample(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # float32 named: the samples below, from processes and from this one, are compared with each other, and
    # a hardware choice injected into this process only (tests/runtime/test_precision.py) must not split them
    proc = run("train.py", *TINY, f"--data.corpus={corpus}", f"--out_dir={out}", "--train.max_steps=20",
               "--train.eval_interval=10", "--train.ckpt_interval=10", "--train.sample_tokens=20",
               "--model.dtype=float32")
    assert proc.returncode == 0, proc.stderr
    for fragment in ["val loss", "tok/s", "left", "sample:", "done: 20 steps"]:
        assert fragment in proc.stdout
    proc = run("sample.py", f"--checkpoint={out}", "--prompt=def ", "--max_new_tokens=16", "--num_samples=2",
               "--temperature=0")
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.split("-" * 40)
    assert len(samples) == 2 and all(s.lstrip("\n").startswith("def ") for s in samples)
    assert samples[0].strip("\n") == samples[1].strip("\n")  # greedy: both the same

    # in a terminal the text is streamed as it is decoded: the same text
    code, streamed = run_in_terminal("sample.py", f"--checkpoint={out}", "--prompt=def ", "--max_new_tokens=16",
                                     "--temperature=0")
    assert code == 0 and streamed.strip("\n") == samples[0].strip("\n")

    proc = run("sample.py", f"--checkpoint={out}", "--max_new_tokens=8", stdin="    return ")
    assert proc.returncode == 0 and proc.stdout.startswith("    return ")

    # many prompts from a file, the samples as JSONL
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def ", "id": 7}\n\n{"prompt": "    return "}\n')
    results = tmp_path / "samples.jsonl"
    sample_here(capsys, f"--checkpoint={out}", f"--prompts_file={prompts}", f"--output={results}",
                "--max_new_tokens=16", "--temperature=0")
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["def ", "    return "]
    assert (lines[0]["prompt"] + lines[0]["completion"]).strip("\n") == samples[0].strip("\n")
    assert {k: lines[1][k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")} == \
        {"max_new_tokens": 16, "temperature": 0.0, "top_k": 200, "top_p": 1.0, "seed": 0}
    # stop strings: each prompt's completion ends before its first one (two characters of the first's, a newline)
    stops = [lines[0]["completion"][4:6], "\n"]
    stopped = tmp_path / "stopped.jsonl"
    sample_here(capsys, f"--checkpoint={out}", f"--prompts_file={prompts}", f"--output={stopped}",
                "--max_new_tokens=16", "--temperature=0", f"--stop={json.dumps(stops)}")
    cut = [json.loads(line) for line in stopped.read_text().splitlines()]
    assert [c["stop"] for c in cut] == [stops] * 2
    expected = [min((t[:t.find(s)] for s in stops if s in t), key=len, default=t) for t in
                (line["completion"] for line in lines)]
    assert [c["completion"] for c in cut] == expected and len(expected[0]) <= 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \nclass \n")
    printed, _ = sample_here(capsys, f"--checkpoint={out}", f"--prompts_file={prompts}", "--num_samples=2",
                             "--max_new_tokens=8", "--temperature=1.0")
    assert printed.count("-" * 40) == 3

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("x" * 100)
    _, warned = sample_here(capsys, f"--checkpoint={out}", f"--prompt_file={prompt}", "--max_new_tokens=4")
    assert "the prompt has 100 tokens, more than the context of 32; only its last 32 tokens are used" in warned

    # continuing a finished run into more steps
    proc = run("train.py", *TINY, f"--data.corpus={corpus}", f"--out_dir={out}", "--train.max_steps=25",
               "--train.eval_interval=10", "--train.ckpt_interval=10", "--train.resume=true",
               "--train.sample_tokens=0", "--model.dtype=float32")
    assert proc.returncode == 0, proc.stderr
    assert "continuing from step 20" in proc.stdout and "done: 25 steps" in proc.stdout


def test_bad_config_errors():
    assert_user_error(run("train.py", "--model.n_layr=2"), "unknown option --model.n_layr", "--model.n_layer")
    assert_user_error(run("train.py", "--train.max_steps=ten"), "--train.max_steps expects an integer, got 'ten'")
    assert_user_error(run("train.py", "--config=nope"), "no preset 'nope'")


def test_bad_corpus_errors(tmp_path):
    assert_user_error(run("train.py", *TINY, f"--data.corpus={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'r'}"),
                      "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_user_error(run("train.py", *TINY, f"--data.corpus={empty}", f"--out_dir={tmp_path / 'r'}"), "is empty")
    small = tmp_path / "small.txt"
    small.write_text("too short for one window\n")
    assert_user_error(run("train.py", *TINY, f"--data.corpus={small}", f"--out_dir={tmp_path / 'r'}"),
                      "too small for the context")


def test_bad_checkpoint_errors(tmp_path):
    assert_user_error(run("sample.py", f"--checkpoint={tmp_path / 'missing'}"), "does not exist")
    (tmp_path / "empty_run").mkdir()
    assert_user_error(run("sample.py", f"--checkpoint={tmp_path / 'empty_run'}"), "holds no checkpoint")


@pytest.mark.parametrize("args", [["--temperature=-1"], ["--num_samples=0"], ["--bogus=1"], ['--stop=["a"']])
def test_bad_sample_options(args, tmp_path):
    assert run("sample.py", f"--checkpoint={tmp_path}", *args).returncode == 2


def test_bad_prompts_files(tmp_path):
    assert_user_error(run("sample.py", f"--prompts_file={tmp_path / 'none.txt'}"), "prompts file", "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert_user_error(run("sample.py", f"--prompts_file={bad}"), "line 2 of", 'no "prompt" field')
    bad.write_text('{"prompt": "a"}\nnot json\n')
    assert_user_error(run("sample.py", f"--prompts_file={bad}"), "line 2 of", "is not JSON")
    assert_user_error(run("sample.py", "--prompt=a", f"--prompts_file={bad}"), "give one of --prompt")
