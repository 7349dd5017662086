"""One scorer: every figure computed from a model's logits agrees with a direct forward pass, for every model
variant (tied and untied output layers, scanned layers, grouped-query attention, rotary, RMSNorm) in float32
and in bfloat16. The consumers: training's validation loss, gptjax.load's logprobs / perplexity /
bits_per_byte, `gptjax.eval` on a text and on tasks (the request scorer), the lm-eval model, the quality
bench, and the sampler's greedy choice through its (D, V) copy of the output layer."""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.config import Config, DataConfig, ModelConfig
from gptjax.weights.convert import save_run
from gptjax.model.score import Scorer
from gptjax.eval.text import score_text
from gptjax.model.gpt import GPT
from gptjax.inference.pretrained import Pretrained
from gptjax.train.step import make_eval_step

T = 32
TEXT = "def f(x):\n    return x * 2 + 1\n"  # 31 bytes: one window of the context, from its start
# float32 agrees to rounding; bfloat16 products round each logit to ~3 significant digits, and a sum of
# logits in another order (chunked, or the (D, V) copy) moves a log-probability by up to a few hundredths
TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2}
VARIANTS = {
    "tied": {},
    "untied": {"tie_embeddings": False},
    "scanned": {"scan_layers": True, "tie_embeddings": False},
    "gqa": {"n_head": 4, "n_kv_head": 2},
    "rope_rmsnorm": {"pos_encoding": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "bias": False,
                     "tie_embeddings": False},
}


def make_model(variant: str, dtype: str) -> Pretrained:
    """A byte-level model whose every parameter is random (an untied output layer starts at zero, which would
    make it indistinguishable from any other matrix)."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=257, dtype=dtype)
    cfg = dataclasses.replace(cfg, **VARIANTS[variant])
    graphdef, state = nnx.split(GPT(cfg, nnx.Rngs(1)), nnx.Param)
    params = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return Pretrained(Config(model=cfg, data=DataConfig(tokenizer="byte")), graphdef, params, 0, Path("."))


def direct_logp(m: Pretrained, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t = 1.. from the model's own forward pass (its logits, log-softmaxed)."""
    x = np.zeros((1, T), np.int32)
    x[0, :len(ids) - 1] = ids[:-1]
    logp = jax.nn.log_softmax(nnx.merge(m.graphdef, m.params)(jnp.asarray(x)), axis=-1)[0]
    return np.asarray([logp[t - 1, ids[t]] for t in range(1, len(ids))], np.float64)


@pytest.fixture(scope="module", params=[(v, d) for d in ("float32", "bfloat16") for v in VARIANTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    variant, dtype = request.param
    m = make_model(variant, dtype)
    ids = [m.tokenizer.eot_id, *m.tokenizer.encode(TEXT)]
    assert len(ids) - 1 <= T
    return m, ids, direct_logp(m, ids), TOLERANCE[dtype]


def test_the_model_computes_in_the_dtype_asked_for(case):
    m, *_ = case
    assert m.dtype == m.config.model.dtype and f"{m.dtype} compute" in repr(m)


def test_validation_loss(case):
    m, ids, expected, tol = case
    n = len(ids) - 1
    x, y = np.asarray([ids[:-1]], np.int32), np.asarray([ids[1:]], np.int32)
    for chunk in (0, 8):  # the whole batch at once, and a few positions at a time (as training's loss_chunk)
        val = float(jax.jit(make_eval_step(m.graphdef, loss_chunk=chunk))(m.params, x, y))
        assert val == pytest.approx(-expected.sum() / n, abs=tol)


def test_logprobs_perplexity_and_bits_per_byte(case):
    m, ids, expected, tol = case
    np.testing.assert_allclose(m.logprobs(TEXT, from_start=True), expected, atol=tol)
    without_start = direct_logp(m, ids[1:])  # the first token is then only context
    np.testing.assert_allclose(m.logprobs(TEXT), without_start, atol=tol)
    assert math.log(m.perplexity(TEXT)) == pytest.approx(-without_start.mean(), abs=tol)
    assert m.bits_per_byte(TEXT) == pytest.approx(-expected.sum() / (len(TEXT.encode()) * math.log(2)), rel=tol)


def test_text_and_task_scores(case, tmp_path):
    m, ids, expected, tol = case
    (tmp_path / "text.txt").write_text(TEXT)
    scorer = Scorer(m.graphdef, m.params, T, batch_size=2)
    score, _ = score_text(scorer, [tmp_path / "text.txt"], m.tokenizer, stride=T)
    # the text's tokens, then its end-of-text: scored too, beyond the direct pass's positions
    assert score.tokens == len(ids) and score.bytes == len(TEXT.encode())
    last = direct_logp(m, [*ids, m.tokenizer.eot_id])[-1]
    assert score.loss == pytest.approx(-(expected.sum() + last) / len(ids), abs=tol)
    # a task request: the continuation's log-likelihood after its context, and whether it is the greedy one
    (ll, greedy), = scorer.requests([(ids[:10], ids[10:])])
    assert ll == pytest.approx(expected[9:].sum(), abs=tol * len(ids))
    x = np.zeros((1, T), np.int32)
    x[0, :len(ids) - 1] = ids[:-1]
    top = np.asarray(jnp.argmax(nnx.merge(m.graphdef, m.params)(jnp.asarray(x))[0], axis=-1))
    if m.dtype == "float32":  # in bfloat16 two near-equal logits may swap places
        assert greedy == all(top[t - 1] == ids[t] for t in range(10, len(ids)))


def test_the_sampler_takes_the_models_own_output_layer(case):
    m, ids, _, _ = case
    prompt = ids[1:]  # a prompt is decoded without the end-of-text a document starts with
    x = np.zeros((1, T), np.int32)
    x[0, :len(prompt)] = prompt
    logits = np.asarray(nnx.merge(m.graphdef, m.params)(jnp.asarray(x))[0, len(prompt) - 1])
    # one prompt: decoded through the loaded model's (D, V) copy of its output layer on a CPU
    first, = [i for new in m._stream_ids([TEXT], 1, 0.0, 0, 1.0, 0, chunk=0) for i in new[0]]
    assert logits[first] >= np.max(logits) - (1e-5 if m.dtype == "float32" else 5e-2)


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_lm_eval_and_the_quality_bench(variant, tmp_path):
    """The harness model and the quality bench read a run directory: the same figures as the direct pass."""
    m = make_model(variant, "float32")
    run = save_run(m.config, m.params, tmp_path / "run", source="test")
    ids = [m.tokenizer.eot_id, *m.tokenizer.encode(TEXT)]
    expected = direct_logp(m, ids)
    from gptjax.bench.quality import score

    assert score(run, [TEXT]) == pytest.approx(-expected.sum() / (len(TEXT.encode()) * math.log(2)), rel=1e-5)
    harness = pytest.importorskip("gptjax.eval.harness", reason="the lm-eval extra is not installed")
    lm = harness.GptjaxLM(str(run), batch_size=2)

    class Request:
        args = (TEXT,)

    assert lm.loglikelihood_rolling([Request()])[0] == pytest.approx(expected.sum(), abs=1e-4)
    (ll, _), = lm._loglikelihood_tokens([(("ctx", "cont"), ids[:10], ids[10:])])
    assert ll == pytest.approx(expected[9:].sum(), abs=1e-4)
