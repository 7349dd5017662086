"""The quality bench's arms: what options each name stands for (the runs themselves are benchmarks)."""

import pytest

from gptjax.bench.quality import ARMS, BASELINE, arm_options


def test_levers_go_on_top_of_the_baseline_and_combine_with_plus():
    assert arm_options("gpt2") == BASELINE
    assert arm_options("rope+muon") == [*BASELINE, *ARMS["rope"], *ARMS["muon"]]


def test_an_arm_of_its_own_starts_from_the_cpu_preset_unless_it_names_one():
    assert arm_options("mine:--model.n_layer=6 --train.lr=1e-3") == ["--config=cpu", "--model.n_layer=6", "--train.lr=1e-3"]
    assert arm_options("old:--config=cpu-gpt2") == ["--config=cpu-gpt2"]
    assert arm_options("cpu:") == ["--config=cpu"]


def test_an_unknown_lever_is_named_with_the_known_ones():
    with pytest.raises(SystemExit, match="unknown arm 'ropes'; known: gpt2, rope"):
        arm_options("ropes")


def test_the_data_arms_and_the_mixture_arm_s_sources(monkeypatch, tmp_path):
    from gptjax import data
    from gptjax.bench import quality
    from gptjax.options import parse_args

    assert arm_options("align") == [*BASELINE, "--data.align=bos", "--data.doc_mask=true"]
    assert arm_options("doc_mask") == [*BASELINE, "--data.doc_mask=true"]
    assert arm_options("mix+seed1")[-1] == "--train.seed=1"  # the spread between seeds, of any arm
    prepared = []
    monkeypatch.setattr(data, "prepare", lambda cfg, folder, **_: prepared.append((cfg.tokenizer, folder)))
    options = arm_options("mix")
    filled, where = quality._with_shards(options, parse_args(options).data, tmp_path / "gpt2")
    assert prepared == [("gpt2", tmp_path / "gpt2")] and where == []  # the default corpus's shards, made first
    mix_ = parse_args(filled).data.mix
    assert mix_.startswith(f"stdlib={tmp_path / 'gpt2'}:0.8,numpy=") and mix_.endswith("numpy/**/*.py:0.2")
