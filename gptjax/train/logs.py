"""Every place a run's figures go, and the way back: metrics.jsonl (MetricsLog, which hands each record
on to the other logs), TensorBoard events when tensorboardX is installed, a Weights & Biases run with
--train.wandb, Silent on the processes other than 0, and read_records, which reads a metrics.jsonl.

W&B: what metrics.jsonl records goes to W&B at the same steps, from process 0 only. The W&B run's id is
kept in <out_dir>/wandb.json, so that a training resumed from a checkpoint (--train.resume=true)
continues the same W&B run; a fresh start makes a new one. W&B's files go to <out_dir>/wandb/, and
its own settings apply as usual: WANDB_MODE=offline keeps the run there for `wandb sync`,
WANDB_ENTITY names the team, `wandb login` or WANDB_API_KEY the account.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import sys
import threading
import weakref
from pathlib import Path

from gptjax.runtime import disk
from gptjax.config import Config
from gptjax.errors import UserError
from gptjax.options import to_dict

WANDB_INSTALL = 'pip install "gptjax[wandb]"'
WANDB_ID_FILE = "wandb.json"


def open_logs(cfg: Config, run_dir: Path, resume_step: int | None, then: str) -> MetricsLog:
    """Process 0's logs of a run: metrics.jsonl, which hands its records to TensorBoard and, with
    --train.wandb, W&B. `resume_step`: the checkpoint a resumed run continues from, None for a new run."""
    others = [WandbLog(cfg, run_dir, resuming=resume_step is not None)] if cfg.train.wandb else []
    return MetricsLog(run_dir, resume_step, others, then=then)


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line cut short (a killed process, a full disk) is left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


_watched: weakref.WeakSet = weakref.WeakSet()
_failures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_hook_installed = False


def _watch(threads) -> None:
    """tensorboardX writes its files from a thread of its own, which a full disk ends with a traceback;
    every record added after that waits forever for it. Such an end is noted here, without the
    traceback, for MetricsLog.write to report as the disk's message."""
    global _hook_installed
    if not _hook_installed:
        _hook_installed = True
        previous = threading.excepthook

        def hook(args):
            if args.thread in _watched and disk.is_write_failure(args.exc_value):
                _failures[args.thread] = args.exc_value
            else:
                previous(args)

        threading.excepthook = hook
    _watched.update(threads)


class MetricsLog:
    """Appends JSON lines to metrics.jsonl and hands each record to the other logs (TensorBoard, W&B).

    On resume, lines past the checkpoint are dropped so that no step is logged twice. A full disk is
    reported as such, with `then` (what to do once it is fixed), and never leaves half a line.
    """

    def __init__(self, run_dir: Path, resume_step: int | None, others=(), then: str = "run the same command again"):
        self.path, self.then = run_dir / "metrics.jsonl", then
        keep = []
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        tmp = self.path.with_name(self.path.name + ".tmp")  # the old log stays whole if this cannot be written
        try:
            with disk.writing(self.path, "the metrics log", len(text), then=then):
                tmp.write_text(text)
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.others = [log for log in (TensorBoardLog.open(run_dir, resume_step, then), *others) if log is not None]

    def write(self, record: dict) -> None:
        line = memoryview((json.dumps(record) + "\n").encode())
        with disk.writing(self.path, "the metrics log", len(line), then=self.then):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    while line:
                        line = line[os.write(fd, line):]
                except OSError:
                    os.ftruncate(fd, start)  # no half line for a reader (or a resume) to trip on
                    raise
            finally:
                os.close(fd)
        for log in self.others:
            log.write(record)

    def close(self, failed: bool = False) -> None:
        for log in self.others:
            log.close(failed)


def _summary_writer():
    """tensorboardX's SummaryWriter, or None where it is not installed. Where PyTorch is installed too,
    tensorboardX imports it on its own import, only to accept torch tensors as values: 1.6 s of a run's start
    on a 2-core EPYC, for figures that are Python numbers here. So PyTorch stays out of that import, unless
    the process has loaded it already; a later `import torch` works as ever."""
    keep_out = "torch" not in sys.modules
    if keep_out:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    finally:
        if keep_out and sys.modules.get("torch", False) is None:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardLog:
    """Event files in <run_dir>/tensorboard/ when tensorboardX is installed (pip install "gptjax[tb]")."""

    QUEUE = 1024  # events waiting for the writer thread (tensorboardX's default: 10)

    def __init__(self, writer, threads: set, folder: Path, then: str):
        self.writer, self.threads, self.folder, self.then = writer, threads, folder, then

    @classmethod
    def open(cls, run_dir: Path, resume_step: int | None, then: str) -> TensorBoardLog | None:
        SummaryWriter = _summary_writer()
        if SummaryWriter is None:
            return None
        start, folder = resume_step or 0, run_dir / "tensorboard"
        before = set(threading.enumerate())
        # purge_step: TensorBoard hides what an interrupted run logged past the checkpoint it resumes from.
        # The file's name holds the second it was opened, so a suffix keeps two starts in one second apart.
        with disk.writing(folder, "the TensorBoard events", then=then):
            # a queue far longer than a record's figures: its writer thread may die (a full disk) between
            # write()'s check and the adds, and an add to a full queue whose reader is gone waits forever
            writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else start + 1,
                                   filename_suffix=f".from-step-{start:09d}", max_queue=cls.QUEUE)
        threads = {t for t in set(threading.enumerate()) - before  # the thread that writes its files
                   if type(t).__module__.startswith("tensorboardX")}
        _watch(threads)
        return cls(writer, threads, folder, then)

    def _alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def write(self, record: dict) -> None:
        if self.writer is not None and not self._alive():
            self.writer = None  # its writer thread is gone: a record added now would wait for it forever
            failure = next((_failures[t] for t in self.threads if t in _failures), None)
            if failure is not None:
                raise disk.write_error(failure, self.folder, "the TensorBoard events", then=self.then)
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def close(self, failed: bool = False) -> None:
        if self.writer is not None and self._alive():
            with disk.writing(self.folder, "the TensorBoard events", then=self.then):
                self.writer.close()


def check_wandb_installed(project: str) -> None:
    """Refuse --train.wandb before any work when the wandb package is missing, saying how to install it."""
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"--train.wandb={project} logs to Weights & Biases, but the wandb package is not installed: "
                        f"{WANDB_INSTALL} (or pip install wandb). Leave --train.wandb empty to train without it.")


def _wandb_run_id(run_dir: Path, project: str, resuming: bool) -> str:
    """The id of the W&B run this training continues, or a new one."""
    if resuming and (run_dir / WANDB_ID_FILE).is_file():
        saved = json.loads((run_dir / WANDB_ID_FILE).read_text())
        if saved.get("project") == project and saved.get("id"):
            return saved["id"]
    return secrets.token_hex(4)  # W&B's ids are 8 lowercase letters and digits too


class WandbLog:
    """A W&B run of --train.wandb's project, named, tagged and given the full config."""

    def __init__(self, cfg: Config, run_dir: Path, resuming: bool):
        import wandb

        t = cfg.train
        run_id = _wandb_run_id(run_dir, t.wandb, resuming)
        tags = [tag.strip() for tag in t.wandb_tags.split(",") if tag.strip()]
        try:
            self.run = wandb.init(project=t.wandb, name=t.wandb_name or Path(cfg.out_dir).resolve().name, tags=tags,
                                  config=to_dict(cfg), dir=str(run_dir), id=run_id, resume="allow")
        except wandb.errors.Error as e:
            raise UserError(f"Weights & Biases could not start the run of --train.wandb={t.wandb}: "
                            f"{str(e).rstrip('.')}. Log in with "
                            "`wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run in "
                            f"{run_dir / 'wandb'} and upload it later with `wandb sync`.") from None
        (run_dir / WANDB_ID_FILE).write_text(json.dumps({"project": t.wandb, "id": run_id}) + "\n")
        # run.step is the step of the next log(): for a resumed online run, the one after the last step
        # W&B holds. What an interrupted training logged past its checkpoint is there already (and,
        # resumed exactly, the same), and W&B would refuse those steps with a warning each.
        self.first_step = self.run.step if resuming else 0

    def write(self, record: dict) -> None:
        if record["step"] >= self.first_step:
            self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Silent:
    """Stands in for the metrics log on processes other than 0."""

    def write(self, record: dict) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass
