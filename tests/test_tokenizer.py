from gptjax.tokenizer import get_tokenizer


def test_gpt2_known_ids():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256
    assert tok.vocab_size == 50257
    assert tok.encode(" the") == [262]
    assert tok.encode("def fib(n):") == [4299, 12900, 7, 77, 2599]


def test_gpt2_round_trip_and_eot():
    tok = get_tokenizer("gpt2")
    text = "Unicode: é ✓ 中文 — and tabs\tand\nnewlines"
    assert tok.decode(tok.encode(text)) == text
    # special-token text in the input is ordinary text, never the end-of-text id
    assert tok.eot_id not in tok.encode("<|endoftext|>")
    # decoding stops at end-of-text
    assert tok.decode(tok.encode("a b") + [tok.eot_id] + tok.encode("c")) == "a b"


def test_byte_tokenizer():
    tok = get_tokenizer("byte")
    assert tok.vocab_size == 257 and tok.eot_id == 256
    text = "héllo ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    # a cut multi-byte character decodes to the replacement character instead of failing
    assert tok.decode(ids[:2]) == "h\ufffd"
