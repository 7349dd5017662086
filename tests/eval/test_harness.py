"""lm-evaluation-harness runs gptjax: `lm_eval --model gptjax` on tasks defined over local JSON files, offline.

The harness finds the model through the .pth file the package installs; here that file and its hook
are put in a fresh site directory, which Python processes as it does site-packages. Skipped without
the `lm-eval` extra (pip install -e ".[lm-eval]").
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import uvicorn
from flax import nnx

pytest.importorskip("lm_eval", reason="the harness tests need lm-evaluation-harness: pip install 'gptjax[lm-eval]'")

from conftest import JAX_CACHE_ENV, ROOT  # noqa: E402
from gptjax import load  # noqa: E402
from gptjax.model.score import Scorer  # noqa: E402
from gptjax.eval.tasks import read_task, score_task  # noqa: E402
from gptjax.inference.serve.__main__ import build  # noqa: E402
from xla_flags import xla_flags  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts processes of its own

TASKS = {
    "gj_choice": """
output_type: multiple_choice
doc_to_text: "{{ctx}}"
doc_to_choice: "{{endings}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    "gj_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
  - metric: word_perplexity
""",
    "gj_generate": """
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "("]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(tmp_path, m):
    """The three local tasks' files, and their documents; two generation answers are what `m` writes."""
    data = {
        "gj_choice": [{"ctx": f"_{i}_2(x):\n    return x *", "endings": [" 2", " 9", " x"], "label": i % 3}
                      for i in range(6)],
        "gj_rolling": [{"text": "def f_1_2(x):\n    return x"}, {"text": "class A:\n    pass"}],
        "gj_generate": [{"prompt": f"def function_{i}_", "answer": "not this"} for i in range(4)],
    }
    # the right answers of two generation prompts are what the model writes before a stop string
    for doc in data["gj_generate"][:2]:
        doc["answer"] = m.generate(doc["prompt"], max_new_tokens=12, temperature=0, stop=["\n", "("])
        assert doc["answer"]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, docs in data.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {tasks / name}.jsonl\ntest_split: test\n" + TASKS[name])
    return tasks, data


def harness(tmp_path, *args, site_dir=None):
    """`lm_eval ARGS` in a process of its own, offline; its results."""
    code = ("import site, sys; site.addsitedir(sys.argv.pop(1)); from lm_eval.__main__ import cli_evaluate; "
            "sys.argv[0] = 'lm_eval'; cli_evaluate()")
    env = {"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **JAX_CACHE_ENV,
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(site_dir or tmp_path), *args, "--output_path",
                           str(tmp_path / "results")], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"lm_eval took {time.perf_counter() - started:.1f} s")
    return json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())["results"]


def check_figures(results, m, tasks, data):
    """The harness's figures are gptjax's own: the task scorer's accuracy, direct forward passes' bits per byte,
    and the two generation answers written by the model."""
    tok = m.tokenizer
    # multiple choice: the harness's accuracy is gptjax's own on the same file
    ours = score_task(Scorer(m.graphdef, m.params, 32, 4), read_task(tasks / "gj_choice.jsonl", tok, 32))
    assert results["gj_choice"]["acc,none"] == pytest.approx(ours["acc"])
    # rolling log-likelihood: every token of each text after an end-of-text, from direct forward passes
    forward = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(m.graphdef, p)(x)))
    lls, nbytes, words = 0.0, 0, 0
    for doc in data["gj_rolling"]:
        ids = [tok.eot_id, *tok.encode(doc["text"])]
        x = np.zeros((1, 32), np.int32)
        x[0, :len(ids) - 1] = ids[:-1]
        logp = np.asarray(forward(m.params, x)[0])
        lls += sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
        nbytes += len(doc["text"].encode())
        words += len(doc["text"].split())
    assert results["gj_rolling"]["bits_per_byte,none"] == pytest.approx(-lls / nbytes / math.log(2), rel=1e-4)
    assert results["gj_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-lls / words), rel=1e-4)
    # generation with stop strings: the two answers written above, and not the wrong one
    assert results["gj_generate"]["exact_match,none"] == pytest.approx(2 / 4)


def test_lm_eval_runs_gptjax_on_local_tasks(task_run, tmp_path):
    run = task_run.run
    m = load(run)
    tasks, data = write_tasks(tmp_path, m)
    site_dir = tmp_path / "site"  # what installing the package puts in site-packages
    site_dir.mkdir()
    shutil.copy(ROOT / "gptjax" / "eval" / "gptjax-lm-eval.pth", site_dir / "gptjax-lm-eval.pth")
    shutil.copy(ROOT / "gptjax" / "eval" / "lm_eval_hook.py", site_dir / "gptjax_lm_eval_hook.py")
    results = harness(tmp_path, "--model", "gptjax", "--model_args", f"path={run}", "--tasks", ",".join(data),
                      "--include_path", str(tasks), "--batch_size", "4", site_dir=site_dir)
    check_figures(results, m, tasks, data)


def test_lm_eval_local_completions_through_gptjax_serve(task_run, tmp_path):
    """The harness's OpenAI-API model against `gptjax serve`: log-likelihoods from echo with logprobs, rolling ones,
    generation with stop strings, counted and cut with the served tokenizer (`tokenizer_backend=remote`, the
    server's /tokenize), two requests at a time; the same figures as gptjax's own."""
    m = load(task_run.run)
    tasks, data = write_tasks(tmp_path, m)
    app, batcher = build(m, "tiny", 4, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        args = (f"base_url=http://127.0.0.1:{port}/v1/completions,model=tiny,tokenizer_backend=remote,"
                f"max_length={m.config.model.block_size},num_concurrent=2,max_retries=1")
        results = harness(tmp_path, "--model", "local-completions", "--model_args", args, "--tasks", ",".join(data),
                          "--include_path", str(tasks))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        batcher.close()
    check_figures(results, m, tasks, data)
