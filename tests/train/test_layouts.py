"""Every layout trains the same model: one device, pmap and fsdp over 8 simulated devices (fsdp also
with the layers scanned), and 2 processes x 4 devices on 127.0.0.1; checkpoints move between
layouts, per-layer and stacked too; bad inputs are refused.

Runs with another device count than this pytest process's 4 go through tests/layout_worker.py.

Tolerance: every layout reads the same global batch and computes the same float32 sums, but in
a different order (per-device partial sums, then an all-reduce; XLA's reduction trees follow the
shapes). A step's loss then differs in its last bit or so, and Adam's normalised updates carry
such differences on without amplifying them (measured over 20 steps: the largest difference was
1.3e-7 relative, one float32 ulp at a loss near 4). rtol=1e-6 (about 8 ulps) leaves room for other
CPUs and XLA versions while staying far below what a real mistake does: one wrong row of the 8
(measured: the same run with row 7 a copy of row 0) moves the losses by 4e-4 to 5e-3 relative.
Parameters after 20 steps agreed to 6e-6 absolute (Adam steps are 3e-3), checked at 1e-4.
The layouts are compared over 4 steps (a checkpoint mid-run, a stop, a resume to step 6): a wrong
row or a wrong reduction shows in the first step's loss already, and a wrong update in the next ones;
20 steps showed nothing more.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, tiny_config
from gptjax.config import DistConfig
from gptjax.options import parse_args, to_toml
from gptjax.data import Dataset, train_batch
from gptjax.train.distributed import detect_cluster
from gptjax.errors import UserError
from gptjax.train.parallel import plan_batch
from gptjax.train.trainer import train
from xla_flags import xla_flags

RTOL = 1e-6
WORKER = str(ROOT / "tests" / "layout_worker.py")
STEPS, MAX_STEPS, CKPT = 4, 6, 2


def quiet(_):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if not line.startswith("[Gloo]")]
    assert proc.returncode == 0, "\n".join(lines[-30:])


def losses(path) -> list[float]:
    h = json.loads(path.read_text())
    assert h["step_compilations"] == 1
    return [h["loss"][str(s)] for s in range(1, STEPS + 1)]


@pytest.mark.slow
def test_every_layout_trains_the_same_model(corpus, tmp_path):
    # a checkpoint at step 2 too: saving mid-run must not race the next step's donated buffers
    cfg = tiny_config(tmp_path / "ref", corpus, max_steps=MAX_STEPS, ckpt_interval=CKPT, eval_interval=STEPS)
    preset = tmp_path / "tiny.toml"
    preset.write_text(to_toml(cfg))

    def run(name, devices, *extra):
        return start("train", devices, tmp_path / f"{name}.json", f"--config={preset}",
                     f"--out_dir={tmp_path / name}", f"--stop_after={STEPS}", *extra)

    port = free_port()
    # pmap asks for 2 x 4 sequences, which 8 devices do not split: re-cut as 1 x 8, the same rows as the others
    procs = [run("pmap8", 8, "--train.batch_size=4", "--train.grad_accum=2"),
             run("fsdp8", 8, "--train.parallel=fsdp")]
    procs += [run("two", 4, f"--dist.coordinator=127.0.0.1:{port}", "--dist.num_processes=2",
                  f"--dist.process_id={p}", "--dist.timeout=120") for p in (0, 1)]
    ref = train(cfg, log=quiet)  # one device of this process, meanwhile
    for p in procs:
        finish(p)
    # the scanned layout after them: with a fifth process beside these, the 2-process run's process 0 twice
    # missed JAX's 300 s shutdown barrier on a loaded 2-core machine
    scan8 = run("scan8", 8, "--train.parallel=fsdp", "--model.scan_layers=true", "--train.remat=dots")
    # meanwhile, resume under other device counts, strategies and layer layouts: 8-device fsdp on 1 device with
    # the layers scanned, 2 x 4 pmap as 4-device fsdp (and below, 8-device scanned fsdp as 4-device pmap per layer)
    resumed = [train(scanned(tiny_config(tmp_path / name, corpus, max_steps=MAX_STEPS, ckpt_interval=CKPT,
                                         eval_interval=STEPS, resume=True, **kw), scan), log=quiet)
               for name, scan, kw in (("fsdp8", True, {"devices": 1}), ("two", False, {"devices": 4, "parallel": "fsdp"}))]
    finish(scan8)
    want = [ref["loss"][s] for s in range(1, STEPS + 1)]
    for name in ("pmap8", "fsdp8", "scan8", "two"):
        np.testing.assert_allclose(losses(tmp_path / f"{name}.json"), want, rtol=RTOL, err_msg=name)
    log = json.loads((tmp_path / "pmap8.json").read_text())["log"]
    assert "batch: 2 x 4 sequences re-cut as 1 x 8, which splits evenly over 8 cpu devices" in log
    assert f"train: {MAX_STEPS} steps of 256 tokens on 8 cpu devices (2 processes x 4) (pmap)" in json.loads(
        (tmp_path / "two.json").read_text())["log"]

    # the checkpoints of step STEPS restore and sample in a fresh single-device process
    sampler = start("sample", tmp_path / "sample.json", STEPS, tmp_path / "ref", tmp_path / "fsdp8", tmp_path / "two",
                    tmp_path / "scan8")
    resumed.append(train(tiny_config(tmp_path / "scan8", corpus, max_steps=MAX_STEPS, ckpt_interval=CKPT,
                                     eval_interval=STEPS, resume=True, devices=4), log=quiet))
    finish(sampler)
    for h in resumed:
        assert sorted(h["loss"]) == list(range(STEPS + 1, MAX_STEPS + 1))
        np.testing.assert_allclose([h["loss"][s] for s in sorted(h["loss"])],
                                   [ref["loss"][s] for s in range(STEPS + 1, MAX_STEPS + 1)], rtol=RTOL)
    samples = json.loads((tmp_path / "sample.json").read_text())
    for d, s in samples.items():
        assert s["step"] == STEPS and s["max_param_diff"] < 1e-4, (d, s)
        assert isinstance(s["sample"], str) and s["sample"], (d, s)


def scanned(cfg, scan: bool):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=scan))


@pytest.mark.slow
def test_fsdp_holds_an_eighth_of_the_state_per_device():
    code = (f"import os; os.environ['XLA_FLAGS'] = '{xla_flags(8)}'; "
            "import json; "
            "from gptjax.options import parse_args; from gptjax.bench.memory import report; "
            "print(json.dumps(report(parse_args(['--train.devices=8', '--data.tokenizer=byte', '--model.n_layer=2', "
            "'--model.n_embd=128', '--model.block_size=64']))))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["pmap"]["state"] == pytest.approx(8 * r["fsdp"]["state"], rel=1e-3)
    # the compiler's own count of the step's inputs: state plus a batch slice; sharding cuts it to about 1/8
    assert r["fsdp"]["arguments"] / r["pmap"]["arguments"] == pytest.approx(1 / 8, rel=0.05)


def test_each_process_reads_only_its_rows_and_together_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    ds = Dataset(tokens, tokens, {})
    x, y = train_batch(ds, 16, 0, 3, 2, 8)
    parts = [train_batch(ds, 16, 0, 3, 2, 8, rows=slice(p * 4, (p + 1) * 4)) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts], axis=1), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts], axis=1), y)


def test_batch_planning():
    assert plan_batch(8, 3, 8) == (3, 8)
    assert plan_batch(6, 4, 8) == (3, 8)  # gradient accumulation asked for: 24 rows re-cut as 3 x 8
    with pytest.raises(UserError, match=r"over 8 devices \(2 processes x 4\); use 8 or 16 .*grad_accum"):
        plan_batch(12, 1, 8, processes=2)
    with pytest.raises(UserError, match="over 8 devices; use 8 "):
        plan_batch(6, 3, 8)  # 18 rows: no re-cut fits either


def test_dist_options_are_checked():
    with pytest.raises(UserError, match="must be host:port"):
        parse_args(["--dist.coordinator=somehost"])
    with pytest.raises(UserError, match="needs --dist.num_processes"):
        parse_args(["--dist.coordinator=somehost:1234"])
    with pytest.raises(UserError, match="0 to 1; got 2"):
        DistConfig(coordinator="h:1", num_processes=2, process_id=2)
    with pytest.raises(UserError, match="need --dist.coordinator"):
        parse_args(["--dist.num_processes=2"])


def test_cluster_detection(monkeypatch):
    for var in ("SLURM_NTASKS", "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert detect_cluster() == ""
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    assert detect_cluster() == ""  # one task: one process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detect_cluster() == "SLURM"


@pytest.mark.slow
def test_unreachable_coordinator_fails_in_bounded_time_naming_it(tmp_path):
    port, other_port = free_port(), free_port()  # nothing listens on `port`
    base = [sys.executable, "train.py", f"--out_dir={tmp_path / 'run'}", "--dist.num_processes=2", "--dist.timeout=2"]
    start_time = time.time()
    # process 1 cannot reach process 0; elsewhere, process 0 waits alone for process 1
    procs = [subprocess.Popen(base + [f"--dist.coordinator=127.0.0.1:{p}", f"--dist.process_id={i}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, p in ((1, port), (0, other_port))]
    (_, err1), (_, err0) = [p.communicate(timeout=60) for p in procs]
    assert time.time() - start_time < 40
    assert [p.returncode for p in procs] == [2, 2]
    assert err1.startswith("error: cannot reach the coordinator at 127.0.0.1:") and str(port) in err1
    assert "error: process 0 of 2 reached the coordinator at 127.0.0.1:" in err0 and "not all 2" in err0
    assert "Traceback" not in err0 + err1
    assert not (tmp_path / "run").exists()
