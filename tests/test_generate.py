import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from gptjax import load
from gptjax.config import ModelConfig
from gptjax.generate import bucket, filter_logits, generate_ids
from gptjax.model import GPT
from gptjax.trainer import train


def small(pos="learned"):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=100, pos_encoding=pos)
    graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(3)), nnx.Param)
    return graphdef, nnx.to_pure_dict(params), cfg


def greedy_by_full_forward(graphdef, params, prompt, n):
    """The reference: no cache, the whole sequence through the model for every new token."""
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, 32), np.int32)  # causal: what follows position len-1 does not matter
        padded[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(forward(params, padded)[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_filter_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert np.isfinite(np.asarray(k2)).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, 1.0, 0, 0.7)  # 0.5 + 0.25 reaches 0.7: keep two
    assert np.isfinite(np.asarray(p)).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, 1.0, 0, 0.5)
    assert np.isfinite(np.asarray(p)).tolist() == [[True, False, False, False]]
    np.testing.assert_allclose(filter_logits(logits, 2.0, 0, 1.0), logits / 2)


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_greedy_cached_decoding_equals_full_forward(pos):
    graphdef, params, cfg = small(pos)
    prompt = [5, 17, 42, 8, 99, 1]
    ids = generate_ids(graphdef, params, [prompt], block_size=32, eot_id=99, max_new_tokens=20, temperature=0)[0]
    expected = greedy_by_full_forward(graphdef, params, prompt, 20)
    if 99 in expected:
        expected = expected[: expected.index(99)]
    assert ids == expected


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_ragged_batch_matches_each_prompt_alone(pos):
    graphdef, params, _ = small(pos)
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [42]]
    kw = dict(block_size=32, eot_id=99, max_new_tokens=12, temperature=0)
    batch = generate_ids(graphdef, params, prompts, **kw)
    for prompt, got in zip(prompts, batch):
        assert got == generate_ids(graphdef, params, [prompt], **kw)[0]


def test_sampling_is_seeded():
    graphdef, params, _ = small()
    kw = dict(block_size=32, eot_id=99, max_new_tokens=15, temperature=1.0, top_k=50)
    a = generate_ids(graphdef, params, [[1, 2]] * 3, seed=1, **kw)
    assert a == generate_ids(graphdef, params, [[1, 2]] * 3, seed=1, **kw)
    assert a != generate_ids(graphdef, params, [[1, 2]] * 3, seed=2, **kw)
    assert len({tuple(r) for r in a}) > 1  # every row draws its own samples


def test_generation_longer_than_the_context_continues():
    graphdef, params, _ = small()
    out = generate_ids(graphdef, params, [list(range(40))], block_size=32, eot_id=-1, max_new_tokens=70,
                       temperature=1.0, seed=0)[0]
    assert len(out) == 70


def test_bucket():
    assert bucket(1, 128) == 16 and bucket(17, 128) == 32 and bucket(100, 128) == 128
    assert bucket(128, 128) == 128 and bucket(20, 24) == 24


def test_load_and_generate_text(corpus, tmp_path):
    train(tiny_config(tmp_path / "run", corpus, max_steps=40, eval_interval=40, ckpt_interval=40), log=lambda m: None)
    model = load(str(tmp_path / "run"))
    text = model.generate("def function_", max_new_tokens=30, temperature=0)
    assert isinstance(text, str) and 0 < len(text) <= 30
    assert not text.startswith("def function_")
    texts = model.generate(["def ", "    return x"], max_new_tokens=10, temperature=0)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts[0] == model.generate("def ", max_new_tokens=10, temperature=0)
