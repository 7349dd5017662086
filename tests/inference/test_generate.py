import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import load
from gptjax.runtime.timing import BACKEND_COMPILE, compile_durations
from gptjax.config import ModelConfig, SampleConfig
from gptjax.errors import UserError
from gptjax.inference.generate import filter_logits, generate_ids, stream_ids
from gptjax.model.score import bucket
from gptjax.model.gpt import GPT


def small(pos="learned"):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=100, pos_encoding=pos, dtype="float32")
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
    kw = dict(block_size=32, eot_id=-1, max_new_tokens=70, temperature=1.0, seed=0)
    out = generate_ids(graphdef, params, [list(range(40))], **kw)[0]
    assert len(out) == 70
    assert generate_ids(graphdef, params, [list(range(40))], chunk=5, **kw)[0] == out  # streamed alike


def count_compilations(fn) -> int:
    """How many XLA compilations running `fn` caused."""
    return len(compile_durations(fn, events=(BACKEND_COMPILE,)))


def test_prompt_lengths_in_one_bucket_compile_once():
    graphdef, params, _ = small()
    # top_k=7: sampling no other test compiles, so the first call here compiles for certain
    kw = dict(block_size=32, eot_id=-1, max_new_tokens=10, top_k=7)
    first = count_compilations(lambda: generate_ids(graphdef, params, [[1, 2, 3]], temperature=0.8, seed=0, **kw))
    assert first >= 2  # the prefill and the decoding loop at least
    same_bucket = [  # prompt lengths 5 to 16 pad to 16; temperature, top-p, seed and streaming are arguments
        lambda: generate_ids(graphdef, params, [list(range(1, 6))], temperature=0.5, seed=1, **kw),
        lambda: generate_ids(graphdef, params, [list(range(1, 12))], temperature=1.3, seed=2, **kw),
        lambda: generate_ids(graphdef, params, [list(range(16))], temperature=0.8, seed=3, chunk=3, **kw),
        lambda: generate_ids(graphdef, params, [[4] * 9], temperature=0.8, seed=3, max_new_tokens=12,
                             **{k: v for k, v in kw.items() if k != "max_new_tokens"}),  # 10 and 12 round to 16
    ]
    assert [count_compilations(fn) for fn in same_bucket] == [0, 0, 0, 0]
    next_bucket = count_compilations(lambda: generate_ids(graphdef, params, [list(range(20))], temperature=0.8, **kw))
    assert next_bucket > 0  # a 20-token prompt pads to 32: the counting sees compilations


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_streamed_tokens_are_the_generated_tokens(temperature):
    graphdef, params, _ = small()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11], [42]]
    kw = dict(block_size=32, max_new_tokens=20, temperature=temperature, top_k=30, top_p=0.9, seed=5)
    free = generate_ids(graphdef, params, prompts, eot_id=-1, **kw)
    eot = free[1][6]  # a token row 1 produces: with it as end-of-text, rows stop at different times
    whole = generate_ids(graphdef, params, prompts, eot_id=eot, **kw)
    assert len(whole[1]) <= 6 and all(eot not in row for row in whole)
    for chunk in (1, 4):
        for eot_id, expected in ((-1, free), (eot, whole)):
            pieces = list(stream_ids(graphdef, params, prompts, eot_id=eot_id, chunk=chunk, **kw))
            assert [sum((p[r] for p in pieces), []) for r in range(3)] == expected
            if eot_id == -1:  # the first token alone (from the prefill), then 19 in chunks
                assert len(pieces) == 1 + -(-19 // chunk)


def test_bucket():
    assert bucket(1, 128) == 16 and bucket(17, 128) == 32 and bucket(100, 128) == 128
    assert bucket(128, 128) == 128 and bucket(20, 24) == 24


@pytest.mark.parametrize("controls, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1, got 0."),
    (dict(temperature=-1.0), "temperature must be 0 (greedy) or positive, got -1.0."),
    (dict(top_k=-1), "top_k must be 0 (off) or positive, got -1."),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0."),
])
def test_sampling_controls_are_refused_with_sample_py_s_messages(controls, message):
    """One check (config.check_sampling): a sampling call and sample.py's options say the same, before any work."""
    kw = dict(max_new_tokens=4, temperature=0.8, top_k=0, top_p=1.0) | controls
    for make in (lambda: generate_ids(None, None, [[1]], block_size=8, eot_id=0, **kw), lambda: SampleConfig(**kw)):
        with pytest.raises(UserError) as e:
            make()
        assert str(e.value) == message


def test_load_and_generate_text(task_run):
    model = load(str(task_run.run))  # the session's tiny trained run (conftest): loading and generating need no other
    text = model.generate("def function_", max_new_tokens=30, temperature=0)
    assert isinstance(text, str) and 0 < len(text) <= 30
    assert not text.startswith("def function_")
    texts = model.generate(["def ", "    return x"], max_new_tokens=10, temperature=0)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts[0] == model.generate("def ", max_new_tokens=10, temperature=0)


def test_stop_strings_end_each_prompt_of_a_ragged_batch_without_compiling():
    from builders import byte_model

    m = byte_model()
    prompts = ["a", "bcdefgh", "ij"]
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=0, seed=11)
    free = m.generate(prompts, **kw)
    # stop strings that each row meets at a different place: two characters from row 1's text, one from row 2's
    stops = [free[1][12:14], free[2][5]]
    cuts = [min((i for i in (t.find(s) for s in stops) if i >= 0), default=len(t)) for t in free]
    assert len(set(cuts)) > 1 and min(cuts) < 40 and cuts[1] <= 12 and cuts[2] <= 5
    stopped = count_compilations(lambda: m.generate(prompts, stop=stops, **kw))
    got = m.generate(prompts, stop=stops, **kw)
    assert stopped == 0  # the same compiled prefill and loop: decoding returns every few tokens to look
    assert got == [t[:c] for t, c in zip(free, cuts)]
    # a prompt alone (its own samples: a row's draws depend on the batch's shape), streamed
    alone = m.generate("bcd", **kw)
    stop = alone[20:22]
    assert "".join(m.stream("bcd", stop=stop, **kw)) == m.generate("bcd", stop=stop, **kw) == alone[:alone.find(stop)]
    assert "~~~~" not in alone and m.generate("bcd", stop="~~~~", **kw) == alone  # never met: the whole text


def test_should_end_stops_a_row_in_the_compiled_loop():
    graphdef, params, _ = small()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11], [42]]
    # one segment (5 + 24 tokens fit the context): past it, the rows still running are prefilled again as a
    # smaller batch, whose random draws differ from the full batch's, so the free run is no reference there
    kw = dict(block_size=32, eot_id=-1, max_new_tokens=24, temperature=0.9, top_k=30, seed=5, chunk=4)
    free = generate_ids(graphdef, params, prompts, **kw)
    seen = {0: 0, 1: 0, 2: 0}

    def should_end(r, ids):
        seen[r] += len(ids)
        return r != 1 and seen[r] >= 5  # rows 0 and 2 end after their second piece (1 + 4 tokens)

    pieces = list(stream_ids(graphdef, params, prompts, should_end=should_end, **kw))
    rows = [sum((p[r] for p in pieces), []) for r in range(3)]
    assert rows == [free[0][:5], free[1], free[2][:5]]  # the others decode on, unchanged
    assert all(not p[0] and not p[2] for p in pieces[2:])
