"""The notebook object: logprobs and perplexity against a direct computation, streaming against generate."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from gptjax.errors import UserError
from gptjax.inference.pretrained import Pretrained

from builders import T, byte_model

def direct_logprobs(m: Pretrained, ids: list[int], starts_targets) -> list[float]:
    """log p(ids[t] | ids[start:t]) for each (start, t), from one plain forward pass over exactly those tokens
    (padded after their end to the context length, which a causal model ignores: one compilation)."""
    forward = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(m.graphdef, p)(x)))
    out = []
    for start, t in starts_targets:
        x = np.zeros((1, T), np.int32)
        x[0, :t - start] = ids[start:t]
        out.append(float(forward(m.params, x)[0, t - start - 1, ids[t]]))
    return out


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_logprobs_of_a_short_text(pos):
    m = byte_model(pos)
    text = "def f(x):\n    return x"
    ids = m.tokenizer.encode(text)
    logp = m.logprobs(text)
    assert logp.shape == (len(ids) - 1,) and logp.dtype == np.float32
    expected = direct_logprobs(m, ids, [(0, t) for t in range(1, len(ids))])
    np.testing.assert_allclose(logp, expected, atol=1e-5)
    assert m.perplexity(text) == pytest.approx(math.exp(-np.mean(expected)), rel=1e-5)


def test_logprobs_of_a_text_longer_than_the_context():
    m = byte_model()
    ids = m.tokenizer.encode("".join(f"line {i}: {i * i}\n" for i in range(12)))
    assert len(ids) > 3 * T
    logp = m.logprobs(m.tokenizer.decode(ids))
    assert logp.shape == (len(ids) - 1,)
    # windows of T tokens advancing by T/2: token t > T is scored after the tokens from the window's start
    stride = T // 2
    targets = [1, 5, T, T + 1, T + stride, T + stride + 1, len(ids) - 1]
    starts = [0 if t <= T else stride * -(-(t - T) // stride) for t in targets]
    assert all(T // 2 < t - s <= T for s, t in zip(starts, targets) if s)
    np.testing.assert_allclose(logp[np.array(targets) - 1], direct_logprobs(m, ids, zip(starts, targets)), atol=1e-5)


def test_perplexity_needs_two_tokens():
    with pytest.raises(UserError, match="at least two tokens"):
        byte_model().perplexity("x")


def test_streamed_text_is_the_generated_text():
    m = byte_model()
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=0, seed=3), dict(temperature=0.7, top_p=0.8, seed=4)):
        pieces = list(m.stream("abc", max_new_tokens=40, **kw))
        assert len(pieces) > 1 and "".join(pieces) == m.generate("abc", max_new_tokens=40, **kw)
    assert "\ufffd" in m.generate("abc", max_new_tokens=40, temperature=1.0, top_k=0, seed=3)  # bytes not UTF-8


def test_generate_in_batches_and_alone_agree():
    m = byte_model()
    prompts = ["a", "bcd", "efghij", "k"]
    batched = m.generate(prompts, max_new_tokens=12, temperature=0, batch_size=3)
    assert batched == [m.generate(p, max_new_tokens=12, temperature=0) for p in prompts]
    with pytest.raises(UserError, match="temperature"):
        m.generate("a", temperature=-1)
