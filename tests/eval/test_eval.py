"""Evaluation: text scoring in sliding windows and zero-shot tasks, against direct forward passes;
python -m gptjax.eval as a person runs it."""

import importlib.util
import json
import math
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import zstandard
from flax import nnx

from conftest import JAX_CACHE_ENV, ROOT, tiny_config
from gptjax.errors import UserError
from gptjax.eval.tasks import read_task, score_task
from gptjax.eval.text import check_stride, score_text
from gptjax.model.score import Scorer, _score, sliding_windows
from builders import T, byte_model
from xla_flags import xla_flags

DOCS = ["def f(x):\n    return x * 2\n", "héllo wörld, ünïcode → bytes\n" * 3, "x = [i * i for i in range(10)]\n" * 2]


def scorer(m, batch_size=3):
    return Scorer(m.graphdef, m.params, m.config.model.block_size, batch_size)


@pytest.mark.parametrize("T_, stride, piece", [(8, 4, 5), (8, 8, 100), (8, 1, 3), (5, 3, 1)])
def test_sliding_windows_score_every_token_once_with_context(T_, stride, piece):
    stream = np.arange(41)
    scored = {}
    for w in sliding_windows((stream[i:i + piece] for i in range(0, 41, piece)), T_, stride):
        assert len(w.x) == len(w.y) <= T_ and 0 <= w.first < w.end <= len(w.y)
        for j in range(w.first, w.end):
            assert w.y[j] not in scored
            scored[int(w.y[j])] = j + 1  # tokens of context: the window's inputs up to j
    assert sorted(scored) == list(range(1, 41))
    assert all(n >= min(g, T_ - stride + 1) for g, n in scored.items())


def direct(m):
    """log p(ids[t] | ids[start:t]) from a plain forward pass over exactly those tokens (padded after their
    end to the context, which a causal model ignores), compiled once."""
    forward = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(m.graphdef, p)(x)))

    def logp(ids, start, t, greedy=False):
        x = np.zeros((1, T), np.int32)
        x[0, :t - start] = ids[start:t]
        row = np.asarray(forward(m.params, x)[0, t - start - 1])
        return int(np.argmax(row)) == ids[t] if greedy else float(row[ids[t]])

    return logp


def expected_nll(logp, ids, stride):
    """The summed negative log-likelihood of ids[1:], each target after its window's tokens, by direct forward passes."""
    starts = [0 if g <= T else stride * -(-(g - T) // stride) for g in range(1, len(ids))]
    return -sum(logp(ids, s, g) for s, g in zip(starts, range(1, len(ids))))


def test_text_scores_equal_a_direct_forward_pass(tmp_path):
    m = byte_model()
    logp = direct(m)
    eot = m.tokenizer.eot_id
    # one short document: a single window
    (tmp_path / "short.txt").write_text(DOCS[0])
    ids = [eot, *m.tokenizer.encode(DOCS[0]), eot]
    assert len(ids) - 1 <= T
    score, problems = score_text(scorer(m), [tmp_path / "short.txt"], m.tokenizer, stride=16)
    nll = expected_nll(logp, ids, 16)
    assert score.tokens == len(ids) - 1 and score.bytes == len(DOCS[0].encode()) and score.documents == 1
    assert score.loss == pytest.approx(nll / score.tokens, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nll / score.tokens), rel=1e-5)
    assert score.bits_per_byte == pytest.approx(nll / math.log(2) / score.bytes, rel=1e-5)

    # documents of a JSON Lines file, streamed in small pieces, windows over all of them
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS) + "not json\n")
    ids = [eot] + sum(([*m.tokenizer.encode(d), eot] for d in DOCS), [])
    assert len(ids) > 5 * T
    zst = tmp_path / "docs.jsonl.zst"  # compressed as corpora are kept: the same documents, the same figures
    zst.write_bytes(zstandard.ZstdCompressor().compress(jsonl.read_bytes()))
    compiled = _score._cache_size()
    for stride, path in ((5, jsonl), (16, zst), (32, jsonl)):
        score, problems = score_text(scorer(m), [path], m.tokenizer, stride)
        assert problems.counts == {"bad_json": 1}
        assert (score.tokens, score.documents) == (len(ids) - 1, 3)
        assert score.bytes == sum(len(d.encode()) for d in DOCS)  # non-ASCII characters count their bytes
        assert score.loss * score.tokens == pytest.approx(expected_nll(logp, ids, stride), rel=1e-5)
    assert _score._cache_size() == compiled  # every window has the context's shape: compiled for the first text only
    with pytest.raises(UserError, match="between 1 .* and the context"):
        check_stride(T + 1, T)
    assert check_stride(0, T) == T // 2


def test_tasks_equal_direct_log_likelihoods(tmp_path):
    m = byte_model()
    logp = direct(m)
    tok = m.tokenizer
    choice = tmp_path / "choice.jsonl"
    examples = [{"ctx": "def f(x):", "endings": ["return x", "pass", " yield"], "label": 0},
                {"ctx": "a = ", "endings": ["1", "'one'"], "label": "1"},
                {"ctx": "x" * 40, "endings": ["y", "z"], "label": 1},  # longer than the context: skipped
                {"ctx": "", "endings": ["import os", "import sys"], "label": 1}]
    choice.write_text("\n".join(json.dumps(e) for e in examples) + "\n\n")
    task = read_task(choice, tok, T)
    assert task.name == "choice" and task.skipped == [f"{choice}:3"] and len(task.examples) == 3
    figures = score_task(scorer(m), task)

    def ll(context, continuation):
        ctx = tok.encode(context) or [tok.eot_id]
        ids = ctx + tok.encode(continuation)
        return sum(logp(ids, 0, t) for t in range(len(ctx), len(ids))), len(ids) - len(ctx)

    right = right_norm = 0
    for e in (examples[0], examples[1], examples[3]):
        sep = " " if e["ctx"] and not e["ctx"].endswith(" ") else ""
        scores = [ll(e["ctx"], ("" if x[0] == " " else sep) + x) for x in e["endings"]]
        right += int(np.argmax([s for s, _ in scores]) == int(e["label"]))
        right_norm += int(np.argmax([s / n for s, n in scores]) == int(e["label"]))
    assert figures == {"kind": "multiple_choice", "examples": 3, "skipped": 1, "acc": right / 3,
                       "acc_norm": right_norm / 3}

    words = tmp_path / "words.jsonl"
    texts = ["the cat sat on the mat", "one two three\tfour  ", "print(x) end"]
    words.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    figures = score_task(scorer(m, batch_size=2), read_task(words, tok, T))
    lls, greedy = [], []
    for t in texts:
        t = t.rstrip()
        cut = max(t.rfind(" "), t.rfind("\t"))
        ids = tok.encode(t)
        lls.append(sum(logp(ids, 0, i) for i in range(cut, len(ids))))
        greedy.append(all(logp(ids, 0, i, greedy=True) for i in range(cut, len(ids))))
    assert figures == {"kind": "last_word", "examples": 3, "skipped": 0, "acc": np.mean(greedy),
                       "perplexity": pytest.approx(math.exp(-np.mean(lls)), rel=1e-5)}


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', '"label" 2 is out of range for 2 endings (0 to 1)'),
    ('{"ctx": "a", "endings": ["b"], "label": 0}', "at least two"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": true}', "index of the right ending"),
    ('{"text": "oneword"}', "no last word"),
    ('{"question": "?"}', 'no "endings" or "text" field (fields: question)'),
    ('{"text": "a b"}', "a last word example in a file of multiple choice examples"),
])
def test_bad_task_lines_are_named(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n\n' + line + "\n")
    with pytest.raises(UserError, match="task.jsonl:3: ") as e:
        read_task(path, byte_model().tokenizer, T)
    assert message in str(e.value)


def run_eval(*args, env=None):
    env = {"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           **JAX_CACHE_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "gptjax.eval", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.mark.slow
def test_training_scores_tasks_and_the_command_line_evaluates(task_run, tmp_path):
    from gptjax import load
    from gptjax.train.trainer import train

    run, corpus, task, history = task_run.run, task_run.corpus, task_run.task, task_run.history
    with pytest.raises(UserError, match="task file .*missing.jsonl does not exist"):
        train(tiny_config(tmp_path / "bad", corpus, eval_tasks=f"{task},{tmp_path / 'missing.jsonl'}"))
    m = load(run)
    at_end = score_task(scorer(m), read_task(task, m.tokenizer, 32))
    assert sorted(history["tasks"]) == [0, 3, 6]
    assert history["tasks"][6] == {"mc": {"acc": at_end["acc"], "acc_norm": at_end["acc_norm"]}}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in logged] == [0, 3, 6] and all({"mc/acc", "mc/acc_norm"} <= set(r) for r in logged)
    assert logged[-1]["mc/acc_norm"] == at_end["acc_norm"]
    if importlib.util.find_spec("matplotlib"):  # the plot grows a panel of task accuracies
        from gptjax.train.plot import plot

        png = plot([run], tmp_path / "loss.png").read_bytes()
        # three loss panels (steps, tokens, seconds), 6 inches each at 120 dpi, and the tasks' fourth
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 4 * 6 * 120

    out = tmp_path / "figures.json"
    proc = run_eval(run, f"--text={corpus}/doc00*.py", "--stride=8", f"--task={task}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    files = sorted(corpus.glob("doc00*.py"))
    expected, _ = score_text(scorer(m, 8), files, m.tokenizer, 8)
    assert figures["step"] == 6 and figures["settings"]["stride"] == 8 and figures["model"]["block_size"] == 32
    assert figures["text"]["tokens"] == expected.tokens and figures["text"]["documents"] == 10
    assert figures["text"]["loss"] == pytest.approx(expected.loss, rel=1e-5)
    assert figures["tasks"]["mc"] == {**score_task(scorer(m), read_task(task, m.tokenizer, 32)), "file": str(task),
                                      "skipped_examples": []}
    assert f"perplexity {expected.perplexity:.3f}" in proc.stdout and "task mc (multiple choice, 5 examples)" in proc.stdout

    task = tmp_path / "bad.jsonl"
    task.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": "a", "endings": ["b", "c"], "label": 5}\n')
    proc = run_eval(run, f"--task={task}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {task}:2: \"label\" 5 is out of range" in proc.stderr
    proc = run_eval(run)
    assert proc.returncode == 2 and "nothing to evaluate" in proc.stderr
    proc = run_eval(run, f"--text=code={corpus},code={corpus}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "names the text 'code' twice" in proc.stderr


def test_text_perplexity_agrees_with_transformers(tmp_path, monkeypatch):
    """An imported GPT-2 (random weights, the GPT-2 vocabulary): gptjax's streamed scoring against
    transformers' log-probabilities over the same windows, in float32 even where auto means bfloat16."""
    torch = pytest.importorskip("torch", reason="the HF parity tests need PyTorch: pip install 'gptjax[hf]'")
    pytest.importorskip("transformers", reason="the HF parity tests need transformers: pip install 'gptjax[hf]'")
    from gptjax import load
    from builders import make_hf

    hf = make_hf(tmp_path / "hf", n_layer=2, n_head=2, n_embd=64, n_positions=16, vocab_size=50257)
    monkeypatch.setenv("GPTJAX_HARDWARE", "backend=gpu")  # auto: bfloat16
    m = load(f"hf:{tmp_path / 'hf'}")
    assert m.dtype == "float32" and load(f"hf:{tmp_path / 'hf'}", dtype="auto").dtype == "bfloat16"
    docs = ["The quick brown fox jumps over the lazy dog, again and again, until the dog gets up.",
            "Perplexity is the exponential of the mean negative log-likelihood per token — über simple."]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    score, _ = score_text(Scorer(m.graphdef, m.params, 16, 4), [tmp_path / "docs.jsonl"], m.tokenizer, stride=6)
    eot = m.tokenizer.eot_id
    ids = [eot] + sum(([*m.tokenizer.encode(d), eot] for d in docs), [])
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in sliding_windows([np.asarray(ids)], 16, 6):
            logp = torch.log_softmax(hf(torch.tensor(w.x[None], dtype=torch.long)).logits[0], dim=-1).numpy()
            nll -= sum(float(logp[j, w.y[j]]) for j in range(w.first, w.end))
            n += w.end - w.first
    assert score.tokens == n == len(ids) - 1 > 2 * 16
    assert score.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert score.bits_per_byte == pytest.approx(nll / math.log(2) / sum(len(d.encode()) for d in docs), rel=1e-4)


@pytest.mark.slow
def test_the_command_line_names_its_compute_dtype(tmp_path):
    """hf:DIR evaluates in float32 by default, even where auto means bfloat16; --dtype chooses another, and
    the `evaluating` line and the JSON both say which; the figure line keeps its form."""
    from builders import make_hf

    make_hf(tmp_path / "hf", n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=50257)
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog, again and again.\n")
    env = {"GPTJAX_HARDWARE": "backend=gpu"}
    for given, dtype in (("checkpoint", "float32"), ("bfloat16", "bfloat16"), ("auto", "bfloat16")):
        out = tmp_path / f"{given}.json"
        proc = run_eval(f"hf:{tmp_path / 'hf'}", f"--text={tmp_path / 'text.txt'}", f"--dtype={given}",
                        f"--output={out}", env=env)
        assert proc.returncode == 0, proc.stderr
        evaluating = next(line for line in proc.stdout.splitlines() if line.startswith("evaluating"))
        assert f"{dtype} compute" in evaluating and ("auto: gpu" in evaluating) == (given == "auto"), evaluating
        assert json.loads(out.read_text())["compute_dtype"] == dtype
        assert re.search(r"loss [\d.]+ \| perplexity [\d.]+ \| bits per byte [\d.]+ \|", proc.stdout), proc.stdout


def test_the_progress_line_writes_to_standard_error_as_it_is_now(monkeypatch):
    """Not to the stream standard error was when the module was imported (closed since, under a test's capture)."""
    import io

    from gptjax.eval.__main__ import ProgressLine

    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    assert ProgressLine().stream is now and not ProgressLine().shown
