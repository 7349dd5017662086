"""TensorBoard events and a Weights & Biases run (offline) hold what metrics.jsonl holds, through a resume.

One training, interrupted by a checkpointed stop and resumed, writes all three; each log is read back
with its own tool's reader: TensorBoard's event loader, and W&B's run file (W&B's offline mode writes
everything locally, as `wandb sync` would upload it: no network).
"""

import dataclasses
import importlib.util
import json
import struct
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_config
from gptjax.errors import UserError
from gptjax.options import to_dict
from gptjax.train.setup import resolve
from gptjax.train.trainer import train
from gptjax.train.logs import WandbLog

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TENSORBOARD = all(importlib.util.find_spec(m) is not None for m in ("tensorboardX", "tensorboard"))


def quiet(_):
    pass


def wandb_teardown():
    """Stop W&B's service in this process: it reads WANDB_MODE and its other settings once, when it starts."""
    import wandb

    wandb.teardown()


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A run of 12 steps stopped at step 6 and resumed, logging to W&B offline when wandb is installed."""
    if not (HAS_WANDB or HAS_TENSORBOARD):
        pytest.skip('the run logs need pip install "gptjax[tb]" or "gptjax[wandb]"')
    from conftest import make_corpus

    tmp = tmp_path_factory.mktemp("logs")
    wandb = dict(wandb="gptjax-tests", wandb_name="tiny", wandb_tags="ci, offline") if HAS_WANDB else {}
    cfg = tiny_config(tmp / "run", make_corpus(tmp / "corpus"), max_steps=12, **wandb)
    env = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp / "wandb-cache"), "WANDB_DATA_DIR": str(tmp / "wandb-data")}
    if HAS_WANDB:  # a service a test of this worker started online would keep that mode
        wandb_teardown()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        train(cfg, log=quiet, stop_after=6)
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True)), log=quiet)
        if HAS_WANDB:
            wandb_teardown()
    run = tmp / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in metrics} == {0, 3, 6, 9, 12}
    return cfg, run, metrics


def expected(metrics: list[dict]) -> dict:
    """(name, step) -> value of every figure in metrics.jsonl."""
    return {(k, r["step"]): v for r in metrics for k, v in r.items() if k != "step" and v is not None}


@pytest.mark.skipif(not HAS_TENSORBOARD, reason='TensorBoard events need pip install "gptjax[tb]"')
def test_tensorboard_events_hold_the_metrics(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, metrics = resumed_run
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per start
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    want = expected(metrics)
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)  # TensorBoard keeps float32


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_TENSORBOARD and importlib.util.find_spec("torch")), reason="needs tensorboardX and torch")
def test_tensorboard_opens_without_importing_torch(tmp_path):
    """tensorboardX imports PyTorch, where installed, for values this log never writes (1.6 s of a start)."""
    code = ("import sys; from pathlib import Path; from gptjax.train.logs import TensorBoardLog; "
            "log = TensorBoardLog.open(Path(sys.argv[1]), None, 'then'); log.write({'step': 1, 'loss': 2.5}); "
            "log.close(); print('torch' in sys.modules); import torch; print(torch.ones(2).sum().item())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "2.0"], out.stdout + out.stderr
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def wandb_records(path):
    """The records of a W&B run file (run-<id>.wandb): LevelDB's log format, blocks of 32 KiB, after a
    7-byte W&B header; each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeros: the rest of the block is unused
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.skipif(not HAS_WANDB, reason='W&B logging needs pip install "gptjax[wandb]"')
def test_wandb_offline_run_holds_the_metrics_and_resumes(resumed_run):
    cfg, run, metrics = resumed_run
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the first start and the resume
    run_id = json.loads((run / "wandb.json").read_text())["id"]
    assert all(f.name == f"run-{run_id}.wandb" for f in files)  # the resume continued the same W&B run

    got, starts = {}, []
    for f in files:
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                starts.append(record.run)
            elif kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    name = item.key or "/".join(item.nested_key)
                    if not name.startswith("_"):  # W&B's own: _step, _runtime, _timestamp
                        got[name, step] = json.loads(item.value_json)
    assert [(s.run_id, s.project, s.display_name, list(s.tags)) for s in starts] == \
        [(run_id, "gptjax-tests", "tiny", ["ci", "offline"])] * 2
    config = {item.key: json.loads(item.value_json) for item in starts[0].config.update}
    assert {k: config[k] for k in to_dict(cfg)} == to_dict(resolve(cfg))  # the full config, as the run used it
    assert got == expected(metrics)


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec answers None
    with pytest.raises(UserError, match=r'--train.wandb=proj .* not installed: pip install "gptjax\[wandb\]"'):
        train(tiny_config(tmp_path / "run", tmp_path / "no-corpus", wandb="proj"), log=quiet)
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.skipif(not HAS_WANDB, reason='W&B logging needs pip install "gptjax[wandb]"')
def test_wandb_that_cannot_start_says_what_to_do(tmp_path, monkeypatch):
    # online without an account: W&B refuses at once, before any network
    wandb_teardown()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, value in {"WANDB_MODE": "online", "WANDB_CONFIG_DIR": tmp_path / "config",
                        "NETRC": tmp_path / "no-netrc"}.items():
        monkeypatch.setenv(name, str(value))
    cfg = tiny_config(tmp_path / "run", tmp_path / "corpus", wandb="proj")
    with pytest.raises(UserError, match="Weights & Biases could not start the run of --train.wandb=proj: .*wandb "
                                        "login.*WANDB_MODE=offline"):
        WandbLog(cfg, tmp_path, resuming=False)  # what the trainer opens once the inputs are checked
