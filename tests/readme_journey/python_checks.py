"""What each statement of the README's ```python blocks must give, checked on the record the notebook
runner (notebook.py) writes: its value, what it printed, and facts the follow-up computed."""

import math

import pytest

def value(record: dict) -> dict:
    assert "error" not in record, record["error"]
    return record["value"]


def _generate(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "str" and v["value"], v
    if "stop=" in rec["statement"]:
        assert "\n\n" not in v["value"] and "def " not in v["value"], v


def _generate_list(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "list" and [x["type"] for x in v["items"]] == ["str", "str"], v


def _stream(rec, recs, facts):
    assert "error" not in rec, rec["error"]
    once = recs["m.generate('def fib(n):', max_new_tokens=50)"]
    assert rec["printed"] and rec["printed"] == value(once)["value"], (rec["printed"], once)


def _logprobs(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "ndarray" and v["dtype"] in ("float32", "float64") and v["finite"], v
    assert v["shape"] == [facts["tokens"] - 1] and v["max"] <= 0, (v, facts)


def _perplexity(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "float" and v["finite"] and v["value"] > 1, v
    assert v["value"] == pytest.approx(math.exp(-facts["logprobs_mean"]), rel=1e-5)


def _bits_per_byte(rec, recs, facts):
    v = value(rec)
    assert v["type"] == "float" and v["finite"] and v["value"] > 0, v
    assert v["value"] == pytest.approx(facts["bits_per_byte"], rel=1e-5)  # every token, the first after EOT


def _attributes(rec, recs, facts):
    config, tokenizer, params = value(rec)["items"]
    assert config["type"] == "Config" and tokenizer["type"] == "Tokenizer", (config, tokenizer)
    assert params["type"] == "dict" and params["leaves"] == params["array_leaves"] > 0, params
    # the default preset's untied output layer, at the tiny shape the journey trained
    assert facts["model"] == {"n_layer": 1, "n_embd": 32, "tie_embeddings": False, "pos_encoding": "rope"}, facts
    assert facts["tokenizer"] == "bpe"


def _dtype(rec, recs, facts):
    assert value(rec) in ({"type": "str", "value": "float32"}, {"type": "str", "value": "bfloat16"})
    assert f"{value(rec)['value']} compute" in facts["repr"], facts["repr"]


def _ran(rec, recs, facts):
    assert "error" not in rec, rec["error"]


# each statement of the README's ```python blocks, as ast.unparse writes it -> its check
PY_CHECKS = {
    "import gptjax": _ran,
    "m = gptjax.load('out/run')": _ran,
    "m.generate('def fib(n):', max_new_tokens=50)": _generate,
    "m.generate(['import ', 'class '], max_new_tokens=20, temperature=0)": _generate_list,
    "m.generate('def fib(n):', stop=['\\n\\n', 'def '])": _generate,
    "for piece in m.stream('def fib(n):', max_new_tokens=50):\n    print(piece, end='', flush=True)": _stream,
    "m.logprobs('def fib(n):\\n    return n')": _logprobs,
    "m.perplexity('def fib(n):\\n    return n')": _perplexity,
    "(m.config, m.tokenizer, m.params)": _attributes,
    "m.dtype": _dtype,
    "m.bits_per_byte('def fib(n):\\n    return n')": _bits_per_byte,
}
