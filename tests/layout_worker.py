"""A run in a process of its own, for tests/train/test_layouts.py: the device count (and, with several
processes, the place among them) must be set before JAX starts, which a pytest process cannot do.

  python tests/layout_worker.py train DEVICES RESULT.json --config=PRESET.toml [--key=value ...] [--stop_after=N]
      trains; process 0 writes the history (losses by step, validation losses, compilations, log)
  python tests/layout_worker.py sample RESULT.json STEP RUN_DIR ...
      on one device: restores each run's checkpoint of STEP, samples greedily from it, and writes the
      largest parameter difference from the first run (per layer, whichever layout each run has) and the sample
"""

import os
import sys

from xla_flags import xla_flags  # this script's folder is first on sys.path

mode, devices = sys.argv[1], (sys.argv[2] if sys.argv[1] == "train" else "1")
# patient collectives, quick compilation (tests/xla_flags.py): these processes run side by side on few cores
os.environ["XLA_FLAGS"] = xla_flags(int(devices))
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, installed or not

import jax  # noqa: E402
import numpy as np  # noqa: E402

import gptjax  # noqa: E402
from gptjax.options import parse_args  # noqa: E402
from gptjax.model.stacked import relayout  # noqa: E402
from gptjax.train.trainer import train  # noqa: E402


def run_train(result: str, args: list[str]) -> None:
    stop_after = [int(a.split("=")[1]) for a in args if a.startswith("--stop_after=")]
    cfg = parse_args([a for a in args if not a.startswith("--stop_after=")])
    logs = []
    history = train(cfg, log=logs.append, stop_after=stop_after[0] if stop_after else None)
    if jax.process_index() == 0:
        keep = {k: history[k] for k in ("loss", "val_loss", "step_compilations")}
        Path(result).write_text(json.dumps({**keep, "log": logs}))


def run_sample(result: str, step: int, run_dirs: list[str]) -> None:
    assert len(jax.devices()) == 1
    models = [gptjax.load(d, step=step) for d in run_dirs]
    out = {}
    first = relayout(models[0].params, False)
    for d, m in zip(run_dirs, models):
        params = relayout(m.params, False)
        assert jax.tree.structure(params) == jax.tree.structure(first)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(first)))
        out[d] = {"step": m.step, "max_param_diff": diff, "sample": m.generate("def ", max_new_tokens=8, temperature=0)}
    Path(result).write_text(json.dumps(out))


if __name__ == "__main__":
    if mode == "train":
        run_train(sys.argv[3], sys.argv[4:])
    else:
        run_sample(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
