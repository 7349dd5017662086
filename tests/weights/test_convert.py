"""GPT-2 interop with Hugging Face: gptjax against transformers' GPT2LMHeadModel (PyTorch, CPU) on random weights.

Needs the `hf` extra (torch, transformers); skipped without it. What needs no PyTorch (safetensors files
read, written, loaded and fine-tuned from) is tests/weights/test_hf_weights.py, run where torch cannot be imported.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the HF parity tests need PyTorch: pip install 'gptjax[hf]'")
transformers = pytest.importorskip("transformers",
                                   reason="the HF parity tests need transformers: pip install 'gptjax[hf]'")
transformers.logging.disable_progress_bar()

import gptjax  # noqa: E402
from builders import make_hf  # noqa: E402
from conftest import JAX_CACHE_ENV, ROOT  # noqa: E402
from gptjax.weights import convert, hf  # noqa: E402
from gptjax.weights.checkpoint import flatten, unflatten  # noqa: E402
from gptjax.config import Config, DataConfig, ModelConfig  # noqa: E402
from gptjax.options import parse_args  # noqa: E402
from gptjax.errors import UserError  # noqa: E402
from gptjax.inference.generate import generate_ids  # noqa: E402
from gptjax.model.gpt import GPT  # noqa: E402
from xla_flags import xla_flags  # noqa: E402

# odd widths and head counts, a full and a small vocabulary, short contexts
SHAPES = {
    "3L-5H-40D-V50257": dict(n_layer=3, n_head=5, n_embd=40, n_positions=24, vocab_size=50257),
    "2L-2H-64D-V300": dict(n_layer=2, n_head=2, n_embd=64, n_positions=16, vocab_size=300),
    "1L-1H-8D-V64": dict(n_layer=1, n_head=1, n_embd=8, n_positions=12, vocab_size=64),
}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def graphdef_of(cfg: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))), nnx.Param)[0]


def logits(cfg: ModelConfig, params, ids):
    """gptjax's logits (padded vocabulary), compiled: much faster here than op by op."""
    graphdef = graphdef_of(cfg)
    return np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids))


@pytest.mark.parametrize("name", SHAPES)
def test_logits_and_greedy_match_transformers(name, tmp_path):
    shape = SHAPES[name]
    hf_model = make_hf(tmp_path, **shape)
    config, params = hf.from_hf(tmp_path)
    cfg = config.model
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == tuple(shape.values())
    assert config.data.tokenizer == "gpt2"
    V, T = cfg.vocab_size, cfg.block_size
    ids = np.random.default_rng(0).integers(0, V, (2, T))
    ours = logits(cfg, params, ids)
    assert np.all(np.isneginf(ours[..., V:]))  # padded ids are never predicted
    diff = np.max(np.abs(ours[..., :V] - hf_logits(hf_model, ids)))
    print(f"{name}: max |logit difference| {diff:.2e}")
    assert diff <= 1e-4

    # greedy continuations of ragged prompts, batched here, one by one in transformers
    prompts = [ids[0, :3].tolist(), ids[1, :5].tolist(), ids[0, 2:3].tolist()]
    n_new = T - 5
    ours_new = generate_ids(graphdef_of(cfg), params, prompts, block_size=T, eot_id=cfg.padded_vocab_size,
                            max_new_tokens=n_new, temperature=0)  # an id never produced: no early stop
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    for prompt, got in zip(prompts, ours_new):
        x = torch.tensor([prompt])
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, use_cache=True,
                                max_new_tokens=n_new, min_new_tokens=n_new)
        assert got == out[0, len(prompt):].tolist()


def test_other_file_layouts_read_alike(tmp_path):
    """Shards with an index; pytorch_model.bin as hub checkpoints such as `gpt2` store it (names without
    'transformer.', the causal-mask buffers); a damaged file is refused."""
    model = make_hf(tmp_path / "st", **SHAPES["2L-2H-64D-V300"])
    model.save_pretrained(tmp_path / "shards", max_shard_size="50KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    a = hf.from_hf(tmp_path / "st")[1]
    for other in (tmp_path / "shards", f"hf:{tmp_path / 'bin'}"):
        assert jax.tree.all(jax.tree.map(np.array_equal, a, hf.from_hf(other)[1]))
    (tmp_path / "st" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="model.safetensors cannot be read"):
        hf.from_hf(tmp_path / "st")


def test_a_pickle_holding_more_than_tensors_is_refused_and_nothing_runs(tmp_path):
    make_hf(tmp_path / "st", **SHAPES["1L-1H-8D-V64"])
    folder, ran = tmp_path / "bin", tmp_path / "ran"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "st" / "config.json").read_text())

    class RunsCode:
        def __reduce__(self):  # unpickling calls os.mkdir(ran)
            return os.mkdir, (str(ran),)

    torch.save({"wte.weight": torch.zeros(64, 8), "payload": RunsCode()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError) as error:
        hf.from_hf(folder)
    message = str(error.value)
    assert "pytorch_model.bin holds objects other than tensors (it names posix.mkdir)" in message
    assert "will not be loaded" in message and "safetensors" in message
    assert "weights_only" not in message and "complete?" not in message  # no advice to load it anyway
    assert not ran.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the file does run code when trusted
    assert ran.exists()

    whole = tmp_path / "whole.bin"  # tensors only, but cut short: the one case that asks about completeness
    torch.save({"wte.weight": torch.zeros(64, 8)}, whole)
    (folder / "pytorch_model.bin").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(UserError, match=r"pytorch_model.bin cannot be read: it ends early.*is it complete\?"):
        hf.from_hf(folder)


def test_hf_round_trip_is_bit_exact(tmp_path):
    from safetensors.numpy import load_file

    make_hf(tmp_path / "a", **SHAPES["3L-5H-40D-V50257"])
    config, params = hf.from_hf(tmp_path / "a")
    hf.save_hf(config, params, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_gptjax_round_trip_through_transformers(tmp_path):
    cfg = ModelConfig(n_layer=2, n_head=3, n_embd=24, block_size=20, vocab_size=100, dtype="float32")  # padded to 128
    config = Config(model=cfg, data=DataConfig(tokenizer="gpt2"))
    rng = np.random.default_rng(3)  # every tensor random, the padded embedding rows too
    params = unflatten(hf.abstract_params(cfg),
                       {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in hf.param_shapes(cfg).items()})
    hf.save_hf(config, params, tmp_path / "hf")

    hf_model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = np.random.default_rng(1).integers(0, 100, (2, 20))
    ours = logits(cfg, params, ids)[..., :100]
    assert np.max(np.abs(ours - hf_logits(hf_model.eval(), ids))) <= 1e-4

    back_config, back = hf.from_hf(tmp_path / "hf")
    assert back_config.model == cfg
    flat, flat_back = flatten(params), flatten(back)
    assert flat.keys() == flat_back.keys()
    for k in flat:
        want = np.asarray(flat[k])
        if k == "wte/embedding":  # HF has no padded rows: they come back as zeros
            assert not np.any(np.asarray(flat_back[k])[100:])
            want = want[:100]
        assert np.array_equal(np.asarray(flat_back[k])[: len(want)], want), k


def test_export_without_biases_and_with_sincos_positions(tmp_path):
    """HF's GPT-2 always has biases and a learned position table: zeros and the sine/cosine table do the same."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=10, vocab_size=70, bias=False, pos_encoding="sincos", dtype="float32")
    rng = np.random.default_rng(4)
    params = unflatten(hf.abstract_params(cfg),
                       {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in hf.param_shapes(cfg).items()})
    hf.save_hf(Config(model=cfg, data=DataConfig(tokenizer="byte")), params, tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf_model.config.eos_token_id is None  # the byte tokenizer's end-of-text, 256, is outside this vocabulary
    ids = np.random.default_rng(5).integers(0, 70, (2, 10))
    assert np.max(np.abs(logits(cfg, params, ids)[..., :70] - hf_logits(hf_model, ids))) <= 1e-4


@pytest.mark.slow
def test_command_line_and_load(tmp_path):
    # the full GPT-2 vocabulary, so that sample.py's text prompt has ids inside it
    make_hf(tmp_path / "hf", n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50257)
    convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "run")])
    run, direct = gptjax.load(tmp_path / "run"), gptjax.load(f"hf:{tmp_path / 'hf'}")
    assert run.step == 0 and run.config.model == direct.config.model
    assert jax.tree.all(jax.tree.map(np.array_equal, run.params, direct.params))
    _, params = convert.load_params(tmp_path / "run")
    assert jax.tree.all(jax.tree.map(np.array_equal, params, direct.params))

    convert.main(["to-hf", str(tmp_path / "run"), str(tmp_path / "out"), "--step=0"])
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    ids = np.arange(16)[None]
    ours = logits(direct.config.model, direct.params, ids)[..., :50257]
    assert np.max(np.abs(hf_logits(hf_model.eval(), ids) - ours)) <= 1e-4

    # the converted run samples through sample.py like a trained one
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--checkpoint=hf:{tmp_path / 'hf'}",
                           "--prompt=Hi", "--max_new_tokens=4", "--temperature=0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "XLA_FLAGS": xla_flags(1), **JAX_CACHE_ENV})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hi")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("changes, fragments", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, ["model_type='llama'", "GPT2LMHeadModel"]),
    ({"architectures": ["GPT2ForSequenceClassification"]}, ["GPT2ForSequenceClassification"]),
    ({"activation_function": "relu"}, ["activation_function='relu'"]),
    ({"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
     ["scale_attn_by_inverse_layer_idx=True", "reorder_and_upcast_attn=True"]),
    ({"layer_norm_epsilon": 1e-6}, ["layer_norm_epsilon=1e-06"]),
    ({"n_positions": 20}, ["wpe.weight", "(16, 8)", "(20, 8)"]),
    ({"n_head": 3}, ["n_embd (8) must be a multiple of model.n_head (3)"]),
])
def test_refuses_what_it_cannot_reproduce(tmp_path, changes, fragments):
    make_hf(tmp_path, **{**SHAPES["1L-1H-8D-V64"], "n_positions": 16})
    _edit_config(tmp_path, **changes)
    with pytest.raises(UserError) as e:
        hf.from_hf(tmp_path)
    for f in fragments:
        assert f in str(e.value), str(e.value)


def test_refuses_missing_and_extra_tensors(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    make_hf(tmp_path, **SHAPES["1L-1H-8D-V64"])
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["transformer.h.0.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.q_proj.weight"] = np.zeros((8, 8), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convert.main(["from-hf", str(tmp_path), str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "h.0.mlp.c_fc.bias (shape (32,)) is missing" in err and "h.0.attn.q_proj.weight" in err
    assert not (tmp_path / "run").exists()  # nothing written


# The padded vocabulary rows (50257 -> 50304, 47 rows of width D) are excluded: they are extra zero
# rows of gptjax's embedding that HF's model does not have, and no logit comes from them.
@pytest.mark.parametrize("preset, expected", [
    ("gpt2-124m", 124_439_808), ("gpt2-350m", 354_823_168), ("gpt2-774m", 774_030_080), ("gpt2-1.5b", 1_557_611_200),
])
def test_gpt2_presets_have_the_parameter_counts_of_transformers(preset, expected):
    cfg = parse_args([f"--config={preset}"]).model
    cfg = dataclasses.replace(cfg, vocab_size=50257)
    shapes = hf.param_shapes(cfg)  # abstract: nothing allocated
    ours = sum(int(np.prod(s)) for s in shapes.values()) - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    hf_cfg = transformers.GPT2Config(**hf.hf_config(Config(model=cfg)))
    with torch.device("meta"):
        hf_model = transformers.GPT2LMHeadModel(hf_cfg)
    assert ours == sum(p.numel() for p in hf_model.parameters()) == expected
