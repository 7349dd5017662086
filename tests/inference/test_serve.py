"""gptjax serve: one untrained byte-level model behind one server (a thread on 127.0.0.1) for the module,
asked through the openai package and raw HTTP; every greedy completion is checked against Pretrained.generate."""

import asyncio
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builders import byte_model  # noqa: E402

from starlette.testclient import TestClient  # noqa: E402

from gptjax.inference.serve import batcher as batching  # noqa: E402
from gptjax.inference.serve.__main__ import build  # noqa: E402
from gptjax.inference.serve.app import make_app  # noqa: E402
from gptjax.runtime.timing import BACKEND_COMPILE, compile_durations  # noqa: E402

SLOTS = 8
PROMPTS = ["hello", "ab", "the quick brown", "x", "0123456789", "serve me", "", "zz top"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    model = byte_model()
    app, batcher = build(model, "tiny", SLOTS, None)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield model, f"http://127.0.0.1:{port}", batcher
    server.should_exit = True
    thread.join(timeout=30)
    batcher.close()


@pytest.fixture(scope="module")
def greedy(served):
    model = served[0]
    cache = {}

    def of(prompt: str, n: int = 8, stop=None) -> str:
        if (prompt, n, stop) not in cache:
            cache[prompt, n, stop] = model.generate(prompt, max_new_tokens=n, temperature=0, stop=stop)
        return cache[prompt, n, stop]

    return of


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_completions_greedy_equal_generate(served, greedy):
    _, url, _ = served
    out = client(url).completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [greedy(p) for p in PROMPTS[:3]]
    assert {c.finish_reason for c in out.choices} <= {"stop", "length"}
    assert out.usage.prompt_tokens == sum(len(p.encode()) for p in PROMPTS[:3])
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_stream_with_usage_echo_stop_and_logprobs(served, greedy):
    _, url, _ = served
    prompt, stop = PROMPTS[2], greedy(PROMPTS[2])[3:5]
    chunks = list(client(url).completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}, echo=True,
                                                 stop=stop, logprobs=1))
    text = "".join(c.text for ch in chunks for c in ch.choices)
    assert text == prompt + greedy(prompt, stop=stop)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert [c.finish_reason for ch in chunks for c in ch.choices][-1] == "stop"
    whole = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text and all(x <= 0 for x in lp.token_logprobs)


def test_echo_logprobs_score_the_prompt_as_the_model_does(served):
    """lm-evaluation-harness's log-likelihood request: token ids, echo, logprobs, one new token."""
    model, url, _ = served
    text = "the quick brown fox"
    ids = model.tokenizer.encode(text)
    body = {"prompt": [ids, text], "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 3}
    for c in post(url, body).json()["choices"]:
        lp = c["logprobs"]
        assert c["text"].startswith(text) and lp["tokens"][:len(ids)] == list(text)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], model.logprobs(text), atol=1e-5)
        for chosen, logp, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert top[chosen] == logp and 3 <= len(top) <= 4  # the 3 likeliest, and the token where it is not
            assert sorted(top.values(), reverse=True)[:3] == list(top.values())[:3]
        assert max(lp["top_logprobs"][-1].values()) == lp["token_logprobs"][-1]  # the new token: greedy
        assert lp["text_offset"][:3] == [0, 1, 2]
    streamed = list(client(url).completions.create(model="tiny", prompt=text, max_tokens=3, temperature=0,
                                                   echo=True, logprobs=2, stream=True))
    tokens = [t for ch in streamed for c in ch.choices for t in (c.logprobs.tokens if c.logprobs else [])]
    assert "".join(tokens) == "".join(c.text for ch in streamed for c in ch.choices)


def test_one_request_decodes_one_row(served, monkeypatch):
    """A step costs the rows busy, not the slots: one client alone is decoded at width 1, eight at 8."""
    _, url, batcher = served
    step, widths = batching._step, []
    monkeypatch.setattr(batching, "_step", lambda p, h, c, tok_n, *a, **kw: (widths.append(len(tok_n)),
                                                                           step(p, h, c, tok_n, *a, **kw))[1])
    post(url, {"prompt": "a", "max_tokens": 6, "temperature": 0})
    assert set(widths) == {1} and batcher.widths == [1, 4, SLOTS]
    widths.clear()
    post(url, {"prompt": "a", "max_tokens": 6, "temperature": 0, "n": SLOTS})  # rows join as they are submitted
    assert SLOTS in widths and set(widths) <= set(batcher.widths)


def test_tokenizer_endpoints(served):
    """vLLM's /tokenizer_info, /tokenize and /detokenize, which lm-evaluation-harness's remote tokenizer reads."""
    model, url, _ = served
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == model.config.model.block_size
    out = httpx.post(url + "/tokenize", json={"prompt": "ab<|endoftext|>c", "add_special_tokens": False}).json()
    eot = model.tokenizer.eot_id
    assert out["tokens"] == [*model.tokenizer.encode("ab"), eot, *model.tokenizer.encode("c")] and out["count"] == 4
    assert httpx.post(url + "/detokenize", json={"tokens": out["tokens"]}).json()["prompt"] == "ab<|endoftext|>c"
    for path, body, param in (("/tokenize", {"prompt": 3}, "prompt"), ("/tokenize", {"text": "a"}, "text"),
                              ("/detokenize", {"tokens": [10 ** 7]}, "tokens"), ("/detokenize", {}, "tokens")):
        r = httpx.post(url + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("positions", ["continue", "restart"])
def test_a_document_masked_run_is_served_as_it_scores(positions):
    """--data.doc_mask: a prompt holding an end-of-text is scored, and continued, as the full forward pass of the
    model sees the whole sequence (attention stops at end-of-text; positions restart there with `restart`)."""
    model = byte_model(doc_positions=positions)
    batcher = batching.Batcher(model, 2)
    batcher.warm()
    batcher.start()
    eot = model.tokenizer.eot_id
    ids = [*model.tokenizer.encode("hi there"), eot, *model.tokenizer.encode("ab")]
    forward = jax.jit(lambda p, x: jax.nn.log_softmax(nnx.merge(model.graphdef, p)(x)))
    try:
        with TestClient(make_app(model, batcher, "tiny")) as http:
            r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0, "echo": True,
                                                   "logprobs": 1}).json()
            lp = r["choices"][0]["logprobs"]
            new = [model.tokenizer.encode(t) for t in lp["tokens"][len(ids):]]
            seq = ids + [i for t in new for i in t]
            logp = np.asarray(forward(model.params, np.asarray([seq]))[0])
            np.testing.assert_allclose(lp["token_logprobs"][1:], [logp[t - 1, seq[t]] for t in range(1, len(seq))],
                                       atol=1e-5)
            assert all(seq[t] == logp[t - 1].argmax() for t in range(len(ids), len(seq)))
            text = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "temperature": 0}).json()
            assert text["choices"][0]["text"] == model.generate("hello", max_new_tokens=6, temperature=0)
    finally:
        batcher.close()


def test_async_concurrent_and_sampled(served, greedy):
    _, url, _ = served
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

    async def ask(p):
        return (await aclient.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)).choices[0].text

    async def all_():
        return await asyncio.gather(*(ask(p) for p in PROMPTS))

    assert asyncio.run(all_()) == [greedy(p) for p in PROMPTS]
    kw = dict(model="tiny", prompt="a", max_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=3, n=2)
    one, two = (client(url).completions.create(extra_body={"top_k": 50}, **{k: v for k, v in kw.items()
                                                                            if k != "top_k"}) for _ in range(2))
    assert [c.text for c in one.choices] == [c.text for c in two.choices]  # the same seed, the same samples
    many = client(url).completions.create(model="tiny", prompt=["a"] * (SLOTS + 2), max_tokens=2, temperature=0,
                                          extra_body={"top_k": 10 ** 12})  # more rows than slots wait for one
    assert len({c.text for c in many.choices}) == 1 and len(many.choices) == SLOTS + 2


def test_nothing_compiles_as_requests_come_and_go(served):
    _, url, _ = served

    def traffic():
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: client(url).completions.create(model="tiny", prompt=p, max_tokens=5,
                                                                     temperature=0.5, seed=1), PROMPTS))

    assert compile_durations(traffic, events=(BACKEND_COMPILE,)) == []


def test_load_300_requests_64_clients(served, greedy):
    """A load bounded in count and time, on loopback: 64 clients at once, streamed and whole, of lengths that make
    rows start and end at different steps; every completion is its own prompt's greedy one."""
    _, url, _ = served
    jobs = [(PROMPTS[i % len(PROMPTS)] + str(i % 5), 2 + i % 7, i % 3 == 0) for i in range(300)]
    expected = {(p, n): greedy(p, n) for p, n, _ in jobs}
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

    async def one(prompt, n, stream):
        out = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=stream)
        if stream:
            return "".join([c.text async for chunk in out for c in chunk.choices])
        return out.choices[0].text

    async def load():
        todo, got = list(enumerate(jobs)), {}

        async def worker():
            while todo:
                k, job = todo.pop()
                got[k] = await one(*job)

        await asyncio.gather(*(worker() for _ in range(64)))
        return [got[k] for k in range(len(jobs))]

    started = time.perf_counter()
    assert asyncio.run(load()) == [expected[p, n] for p, n, _ in jobs]
    assert time.perf_counter() - started < 60


def post(url, body, **kw):
    return httpx.post(url + "/v1/completions", timeout=30, **({"json": body} if body is not None else {}), **kw)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "frequency_penalty": 1}, "frequency_penalty"),
    ({"prompt": [1, 10 ** 6]}, "prompt"),
    ({"prompt": [[], "a"]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "a" * 40, "max_tokens": 1}, "prompt"),
    ({"prompt": "a", "max_tokens": 32}, "max_tokens"),
    ({"prompt": "a", "n": SLOTS + 1}, "n"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stop": [""]}, "stop"),
])
def test_bad_requests_answer_400(served, body, param):
    r = post(served[1], body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_malformed_big_chat_and_unknown_paths(served):
    url = served[1]
    r = post(url, None, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    assert post(url, None, content=b"[" * (2 << 20)).status_code == 413
    r = httpx.post(url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing").status_code == 404 and "error" in httpx.get(url + "/v1/nothing").json()
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    assert httpx.get(url + "/health").json()["status"] == "ok"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "v1/completions" in page.text and "src=" not in page.text and "href=" not in page.text


def test_disconnect_frees_the_slot(served, monkeypatch):
    url, batcher = served[1], served[2]
    step, submitted = batching._step, []
    monkeypatch.setattr(batching, "_step", lambda *a, **kw: (time.sleep(0.02), step(*a, **kw))[1])  # 30 tokens: 0.6 s
    submit = batcher.submit
    monkeypatch.setattr(batcher, "submit", lambda r: (submitted.append(r), submit(r)))
    body = {"prompt": "a", "max_tokens": 30, "temperature": 1, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        next(r.iter_lines())
    deadline = time.time() + 10
    while httpx.get(url + "/health").json()["busy_slots"] and time.time() < deadline:
        time.sleep(0.02)
    assert httpx.get(url + "/health").json()["busy_slots"] == 0
    assert submitted[0].cancelled and submitted[0].produced < 30


def test_api_key_is_checked_before_anything_else(served):
    model, _, batcher = served
    with TestClient(make_app(model, batcher, "tiny", "sekret")) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = http.post("/v1/completions", content=b"{not json", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200 == http.get("/").status_code
        key = {"Authorization": "Bearer sekret"}
        r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=key)
        assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_a_failed_decoder_answers_500_and_leaves_no_request_waiting(served, monkeypatch):
    model = served[0]

    def broken(*args, **kwargs):
        raise RuntimeError("broken step")

    monkeypatch.setattr(batching, "_step", broken)
    batcher = batching.Batcher(model, 2)
    batcher.start()
    with TestClient(make_app(model, batcher, "tiny")) as http:
        for _ in range(2):  # the one that met the fault, then one after it
            r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
            assert r.status_code == 500 and "broken step" in r.json()["error"]["message"]
        assert http.get("/health").status_code == 503
    batcher.close()
