"""The `gptjax` command: one subcommand per tool, each the same main() as the script or module it names."""

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT
from gptjax import commands

NAMES = ["train", "sample", "serve", "data", "convert", "bench", "plot", "eval", "memory"]
ENV = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}


def test_pyproject_installs_the_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["gptjax"].partition(":")
    assert getattr(importlib.import_module(module), function) is commands.run


@pytest.mark.slow
def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "gptjax", "--help"], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.split("commands:\n", 1)[1].splitlines() if line.strip()]
    assert listed == NAMES == list(commands.COMMANDS)


@pytest.mark.slow
def test_installed_command_runs_a_subcommand(tmp_path):
    """The program pip wrote from [project.scripts], where this environment has one (CI's does)."""
    program = Path(sys.executable).parent / "gptjax"
    if not program.is_file():
        pytest.skip("no gptjax program beside this Python: pip install -e . writes it")
    proc = subprocess.run([str(program), "data", "prepare", f"--data.corpus={tmp_path / 'missing'}"],
                          capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "does not exist" in proc.stderr


@pytest.mark.parametrize("name", NAMES)
def test_each_subcommand_is_its_module(name, capsys, monkeypatch):
    monkeypatch.setenv("GPTJAX_CPU_TUNING", "off")  # train's main would set malloc up for training in this process
    module = importlib.import_module(commands.COMMANDS[name][0])
    assert commands.find_command(name) is module
    try:
        module.main(["--help"])
    except SystemExit as e:
        assert e.code in (0, None)
    direct = capsys.readouterr().out
    try:
        commands.main([name, "--help"])
    except SystemExit as e:
        assert e.code in (0, None)
    assert capsys.readouterr().out == direct and direct.strip()


@pytest.mark.slow
def test_a_user_error_through_the_command_is_a_clean_exit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gptjax", "data", "prepare", f"--data.corpus={tmp_path / 'nope'}"],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr


def test_unknown_and_unavailable_commands(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        commands.main(["trian"])
    assert e.value.code == 2
    assert "unknown command 'trian'. Did you mean 'train'?" in capsys.readouterr().err
    # a command whose module this installation does not have (eval, until its module exists)
    monkeypatch.setitem(commands.COMMANDS, "eval", ("gptjax.no_such_module", "evaluate"))
    with pytest.raises(SystemExit) as e:
        commands.main(["eval", "--help"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: gptjax eval is not available in this installation")
    assert "The commands available here are train, sample, serve, data, convert, bench, plot, memory." in err
    commands.main(["--help"])
    assert "evaluate (not available in this installation)" in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        commands.main(["plot", str(tmp_path)])
    assert e.value.code == 2
    assert 'plotting needs matplotlib: pip install "gptjax[plot]"' in capsys.readouterr().err
