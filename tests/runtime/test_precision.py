"""What `--model.dtype=auto` stands for, on every branch of the decision, on whatever CPU runs the suite:
the decision's inputs (the backend, the CPU's flags, the measured speed-up) are injected through
GPTJAX_HARDWARE; each branch decides as documented, and a branch of each outcome runs a short train.py, a
resume, sample.py and gptjax.load."""

import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import ARGS, JAX_CACHE_ENV, ROOT, start
from gptjax.runtime import precision
from gptjax.config import ModelConfig
from gptjax.errors import UserError
from gptjax.model import products
from gptjax.model.gpt import GPT
from xla_flags import xla_flags

# (GPTJAX_HARDWARE, what auto must choose, words of the reason the run's header gives)
BRANCHES = {
    "no-units": ("backend=cpu,flags=avx2 fma", "float32", "this CPU has no bfloat16 matrix units"),
    "units-no-speedup": ("backend=cpu,flags=avx512_bf16,speedup=1.1", "float32",
                         "this CPU has avx512_bf16, but the step's products in bfloat16 given only 1.10x"),
    "units-and-speedup": ("backend=cpu,flags=amx_bf16 avx512_bf16,speedup=2.5", "bfloat16",
                          "this CPU's amx_bf16/avx512_bf16: the step's products in bfloat16 given 2.50x"),
    "accelerator": ("backend=gpu", "bfloat16", "gpu with bfloat16 matrix units"),
}


@pytest.mark.parametrize("branch", BRANCHES)
def test_each_branch_decides_as_documented(branch, monkeypatch):
    value, dtype, why = BRANCHES[branch]
    monkeypatch.setenv(precision.HARDWARE_ENV, value)
    decision = precision.decide()
    assert decision.dtype == dtype and why in decision.why and precision.HARDWARE_ENV in decision.why
    assert precision.resolve("auto") == dtype and precision.resolve("float32") == "float32"
    assert precision.explain("auto") == (dtype, f"auto: {decision.why}")
    assert precision.explain("bfloat16") == ("bfloat16", "as set")


def test_a_model_built_inside_a_trace_takes_the_decision(monkeypatch):
    """The decision may be asked for first while a model is being traced (nnx.eval_shape): it must not
    try to time a product on tracers there, which crashed train.py on every CPU with bf16 units."""
    monkeypatch.setenv(precision.HARDWARE_ENV, "backend=cpu,flags=amx_bf16")  # the speed-up is measured
    monkeypatch.setattr(precision, "_decisions", {})
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, dtype="auto")
    model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    assert model.wte.dtype == jnp.dtype(products.decision(cfg).dtype)
    assert "the step's products in bfloat16 measured" in products.decision(cfg).why


def test_the_processes_of_a_run_agree(monkeypatch):
    """Each process measures its own speed-up; a run whose processes found different answers computes in
    float32 everywhere (train() shares the answer through distributed.any_process)."""
    monkeypatch.setattr(precision, "_agreed", {})
    monkeypatch.setattr(precision, "_decisions", {})
    monkeypatch.setenv(precision.HARDWARE_ENV, BRANCHES["units-and-speedup"][0])
    assert precision.agree(everywhere_bfloat16=True).dtype == "bfloat16"
    agreed = precision.agree(everywhere_bfloat16=False)
    assert agreed.dtype == "float32" and agreed.why.startswith("another process of this run found no bfloat16")
    assert precision.resolve("auto") == "float32"
    monkeypatch.setenv(precision.HARDWARE_ENV, BRANCHES["no-units"][0])
    assert precision.agree(everywhere_bfloat16=False).dtype == "float32"


def test_a_wrong_injection_is_refused_with_the_accepted_form(monkeypatch):
    for value in ("backend", "speed=2", "speedup=fast"):
        monkeypatch.setenv(precision.HARDWARE_ENV, value)
        with pytest.raises(UserError, match="GPTJAX_HARDWARE"):
            precision.decide()


@pytest.mark.slow
@pytest.mark.parametrize("branch", ["no-units", "units-and-speedup"])  # one branch of each outcome
def test_train_resume_sample_and_load_on_each_outcome(branch, corpus, tmp_path, monkeypatch):
    """A whole run on a branch that picks float32 and on one that picks bfloat16 (the other two branches
    reach the same two outcomes, and their decisions and headers are checked above, in this process)."""
    value, dtype, why = BRANCHES[branch]
    env = {precision.HARDWARE_ENV: value}
    out = tmp_path / "run"
    short = [a for a in ARGS if not a.startswith(("--train.max_steps", "--model.dtype"))]  # auto, the default
    first = start(out, corpus, "--train.max_steps=4", args=short, env=env)
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log
    assert f"{dtype} compute (auto: {why}" in log, log
    # resumed where auto would now choose the other dtype: the run goes on in the one it started with
    other = BRANCHES["accelerator" if dtype == "float32" else "no-units"][0]
    resumed = start(out, corpus, "--train.max_steps=6", "--train.resume=true", args=short,
                    env={precision.HARDWARE_ENV: other})
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resume: continuing from step 4" in log, log
    assert f"{dtype} compute (auto: as this run decided at its start, {why}" in log, log
    assert 'dtype = "auto"' in (out / "config.toml").read_text()  # recorded as given, for readers elsewhere
    sample = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={out}", "--prompt=def ",
                             "--max_new_tokens=8", "--temperature=0"], capture_output=True, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1), **JAX_CACHE_ENV,
                                 **env},
                            timeout=300)
    assert sample.returncode == 0 and sample.stdout.startswith("def "), sample.stderr
    monkeypatch.setenv(precision.HARDWARE_ENV, value)
    import gptjax

    m = gptjax.load(out)
    assert m.dtype == dtype and f"{dtype} compute" in repr(m) and m.step == 6
    assert m.params["wte"]["embedding"].dtype == jnp.float32  # parameters stay float32 in either
    assert m.perplexity("def f(x):\n    return x") > 1
