"""A run given --data.mix: its mistakes are told before anything is prepared, compiled or written."""

import dataclasses

import pytest

from conftest import tiny_config
from gptjax.config import DataConfig
from gptjax.errors import UserError
from gptjax.train.setup import set_up


@pytest.mark.parametrize("mix_, schedule, says", [
    ("web=a:1,code=b:x", "", "not a number"),
    ("web=a:1,code=b:-1", "", "0 or more"),
    ("web=a:0,code=b:0", "", "sum to zero"),
    ("web=a:1,web=b:1", "", "twice"),
    ("web=a:1,code=b:1", "0:web=1,news=1", "'news' is not a source"),
    ("web=a:1,code=b:1", "", "not wired into the run yet"),
])
def test_a_mixed_run_is_refused_before_anything_is_prepared(tmp_path, mix_, schedule, says):
    cfg = tiny_config(tmp_path / "run", "")
    cfg = dataclasses.replace(cfg, data=DataConfig(mix=mix_, mix_schedule=schedule, tokenizer="byte"))
    with pytest.raises(UserError, match=says):
        set_up(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_the_command_line_exits_2_on_a_bad_weight_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    run = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--out_dir={tmp_path / 'run'}",
                          "--data.mix=web=a:1,code=b:lots"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "'lots' is not a number" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists()
