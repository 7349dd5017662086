"""Weights & Biases: a run's figures in a W&B run, with its name, tags and full config (--train.wandb).

What metrics.jsonl records goes to W&B at the same steps, from process 0 only. The W&B run's id is
kept in <out_dir>/wandb.json, so that a training resumed from a checkpoint (--train.resume=true)
continues the same W&B run; a fresh start makes a new one. W&B's files go to <out_dir>/wandb/, and
its own settings apply as usual: WANDB_MODE=offline keeps the run there for `wandb sync`,
WANDB_ENTITY names the team, `wandb login` or WANDB_API_KEY the account.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path

from gptjax.config import Config
from gptjax.errors import UserError
from gptjax.options import to_dict

INSTALL = 'pip install "gptjax[wandb]"'
ID_FILE = "wandb.json"


def check_installed(project: str) -> None:
    """Refuse --train.wandb before any work when the wandb package is missing, saying how to install it."""
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"--train.wandb={project} logs to Weights & Biases, but the wandb package is not installed: "
                        f"{INSTALL} (or pip install wandb). Leave --train.wandb empty to train without it.")


def _run_id(run_dir: Path, project: str, resuming: bool) -> str:
    """The id of the W&B run this training continues, or a new one."""
    if resuming and (run_dir / ID_FILE).is_file():
        saved = json.loads((run_dir / ID_FILE).read_text())
        if saved.get("project") == project and saved.get("id"):
            return saved["id"]
    return secrets.token_hex(4)  # W&B's ids are 8 lowercase letters and digits too


class WandbLog:
    def __init__(self, cfg: Config, run_dir: Path, resuming: bool):
        import wandb

        t = cfg.train
        run_id = _run_id(run_dir, t.wandb, resuming)
        tags = [tag.strip() for tag in t.wandb_tags.split(",") if tag.strip()]
        try:
            self.run = wandb.init(project=t.wandb, name=t.wandb_name or Path(cfg.out_dir).resolve().name, tags=tags,
                                  config=to_dict(cfg), dir=str(run_dir), id=run_id, resume="allow")
        except wandb.errors.Error as e:
            raise UserError(f"Weights & Biases could not start the run of --train.wandb={t.wandb}: "
                            f"{str(e).rstrip('.')}. Log in with "
                            "`wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run in "
                            f"{run_dir / 'wandb'} and upload it later with `wandb sync`.") from None
        (run_dir / ID_FILE).write_text(json.dumps({"project": t.wandb, "id": run_id}) + "\n")
        # run.step is the step of the next log(): for a resumed online run, the one after the last step
        # W&B holds. What an interrupted training logged past its checkpoint is there already (and,
        # resumed exactly, the same), and W&B would refuse those steps with a warning each.
        self.first_step = self.run.step if resuming else 0

    def write(self, record: dict) -> None:
        if record["step"] >= self.first_step:
            self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
