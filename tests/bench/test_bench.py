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
