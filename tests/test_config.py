import dataclasses
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT
from gptjax.config import Config, ModelConfig, SampleConfig
from gptjax.options import flat_fields, from_dict, load_preset, parse_args, parse_flat, preset_names, to_flat, to_toml
from gptjax.errors import UserError


def test_defaults_and_overrides():
    cfg = parse_args([])
    assert cfg == Config()
    # train.py's own default is the cpu preset; --config= asks for none
    assert parse_args([], default_preset="cpu") == dataclasses.replace(from_dict(Config, load_preset("cpu")),
                                                                      config="cpu")
    assert parse_args(["--config="], default_preset="cpu") == Config()
    cfg = parse_args(["--model.n_layer=3", "--model.n-head", "3", "--model.n_embd=96", "--train.resume",
                      "--data.tokenizer=byte", "--train.lr=1e-4", "--out-dir=x"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (3, 3, 96)
    assert cfg.train.resume is True and cfg.train.lr == 1e-4 and cfg.out_dir == "x"
    assert cfg.data.tokenizer == "byte"
    assert parse_args(["--train.resume=false"]).train.resume is False


def test_required_names_exist():
    keys = flat_fields(Config)
    for name in ["config", "out_dir", "data.corpus", "data.tokenizer", "model.n_layer", "model.n_head",
                 "model.n_embd", "model.block_size", "train.batch_size", "train.max_steps", "train.seed",
                 "train.resume"]:
        assert name in keys


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match=r"unknown option --model.n_layr\. Did you mean --model.n_layer\?"):
        parse_args(["--model.n_layr=2"])
    # the right key in the wrong section
    with pytest.raises(UserError, match=r"Did you mean --train.batch_size\?"):
        parse_args(["--model.batch_size=2"])


def test_wrong_type_and_choice():
    with pytest.raises(UserError, match="--train.batch_size expects an integer, got 'many'"):
        parse_args(["--train.batch_size=many"])
    with pytest.raises(UserError, match="--train.resume expects true or false"):
        parse_args(["--train.resume=maybe"])
    with pytest.raises(UserError, match="must be one of 'gpt2', 'byte'.*Did you mean 'byte'"):
        parse_args(["--data.tokenizer=bytes"])
    with pytest.raises(UserError, match="--train.lr expects a number"):
        parse_args(["--train.lr=fast"])


def test_invalid_values_are_refused():
    with pytest.raises(UserError, match="multiple of model.n_head"):
        parse_args(["--model.n_embd=100", "--model.n_head=3"])
    with pytest.raises(UserError, match="train.batch_size must be at least 1"):
        parse_args(["--train.batch_size=0"])
    with pytest.raises(UserError, match="unexpected argument"):
        parse_args(["positional"])


def test_cpu_gpt2_preset_spells_out_the_defaults():
    assert from_dict(Config, load_preset("cpu-gpt2")) == dataclasses.replace(Config(), out_dir="out/cpu-gpt2")


def test_cpu_preset_is_the_modern_run():
    cfg = from_dict(Config, load_preset("cpu"))
    assert (cfg.model.pos_encoding, cfg.model.norm, cfg.model.mlp, cfg.data.tokenizer, cfg.train.optimizer) == \
        ("rope", "rmsnorm", "relu2", "bpe", "muon")
    assert not cfg.model.is_gpt2() and Config().model.is_gpt2()


@pytest.mark.parametrize("name", ["cpu", "char", "gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b"])
def test_presets_parse(name):
    assert name in preset_names()
    cfg = parse_args([f"--config={name}"])
    assert cfg.config == name


def test_gpt2_preset_shapes():
    shapes = {"gpt2-124m": (12, 12, 768), "gpt2-350m": (24, 16, 1024),
              "gpt2-774m": (36, 20, 1280), "gpt2-1.5b": (48, 25, 1600)}
    for name, shape in shapes.items():
        m = parse_args([f"--config={name}"]).model
        assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (*shape, 1024)


def test_command_line_overrides_preset():
    cfg = parse_args(["--train.max_steps=7", "--config=char"])
    assert cfg.train.max_steps == 7 and cfg.data.tokenizer == "byte"


def test_bad_preset(tmp_path):
    with pytest.raises(UserError, match="no preset 'gpt2-125m'.*Did you mean 'gpt2-124m'"):
        parse_args(["--config=gpt2-125m"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_layers = 3\n")
    with pytest.raises(UserError, match=r"unknown option --model.n_layers in preset .*Did you mean --model.n_layer\?"):
        parse_args([f"--config={bad}"])
    bad.write_text("[model]\nn_layer = 'three'\n")
    with pytest.raises(UserError, match="expects an integer"):
        parse_args([f"--config={bad}"])


@pytest.mark.parametrize("corpus", ['a "quoted" path', "back\\slash", "new\nline", "tab\tbell\x07del\x7f", "é ☃ 😀"])
def test_toml_round_trip(corpus):
    cfg = parse_args(["--config=char", f"--data.corpus={corpus}", "--train.lr=1e-5"])
    assert from_dict(Config, tomllib.loads(to_toml(cfg))) == cfg


def test_sample_config_flat():
    cfg = parse_flat(SampleConfig, ["--prompt=hi", "--top-k=5", "--temperature=0"], prog="sample.py")
    assert (cfg.prompt, cfg.top_k, cfg.temperature) == ("hi", 5, 0.0)
    with pytest.raises(UserError, match="top_p must be in"):
        parse_flat(SampleConfig, ["--top_p=0"], prog="sample.py")


@pytest.mark.slow
def test_help_lists_every_option_with_default():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0
    run = to_flat(parse_args([], default_preset="cpu"))  # train.py's defaults: the cpu preset's values
    for key in flat_fields(Config):
        assert f"--{key} (" in out.stdout
        assert f"default {run[key]!r})\n" in out.stdout.split(f"--{key} (", 1)[1].split("\n", 1)[0] + "\n" \
            or key == "config"
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "--top_p" in out.stdout and "--checkpoint" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args", [["train.py", "--help"], ["sample.py", "--help"], ["train.py", "--model.nlayer=2"],
                                  ["sample.py", "--checkpoint=run", "--top_p=2"], ["-m", "gptjax", "convert", "--help"],
                                  ["-m", "gptjax", "memory", "--help"], ["-m", "gptjax", "memory", "--train.devics=8"]])
def test_help_and_bad_options_answer_without_jax(args):
    """A person reading --help or mistyping an option waits for no JAX to load (2 to 4 s on a 2-core EPYC)."""
    out = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == (0 if "--help" in args else 2), out.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "gptjax.errors" in imported and not {"jax", "flax", "orbax.checkpoint"} & imported


def test_padded_vocab():
    assert ModelConfig(vocab_size=50257).padded_vocab_size == 50304
    assert ModelConfig(vocab_size=257).padded_vocab_size == 320
    assert dataclasses.replace(ModelConfig(vocab_size=257), pad_vocab_to=1).padded_vocab_size == 257
