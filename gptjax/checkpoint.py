"""Checkpoints with orbax: <run>/checkpoints/<step>/{params, opt_state, meta}.

Parameters and optimizer state are saved as flat dicts keyed by their tree paths
('h/0/attn/c_attn/kernel', …), which any process can read back into its own structure
whatever the device layout that wrote them. `meta` is JSON: step, the full config, the
tokenizer name and the data fingerprint. Orbax writes each step into a temporary folder
and renames it when complete, so a crash mid-save never hides the last good checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from gptjax.errors import UserError

CHECKPOINTS = "checkpoints"


def path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree) -> dict:
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(template, flat: dict):
    """Put the values of `flat` back into the structure of `template`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_name(p)] for p, _ in paths])


def _abstract(tree, device=None):
    """Where each leaf is read to: a template's own sharding (fsdp: each process reads only its shards),
    else this process's own device (with several processes, jax.devices()[0] may be another host's)."""
    one = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or one),
                        flatten(tree))


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3, create: bool = True):
        """Keep the `keep` latest checkpoints and, beside them, the one with the lowest validation loss."""
        self.directory = Path(run_dir).absolute() / CHECKPOINTS
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(n=keep),
            cm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Start saving (asynchronously); call wait() before reading it back or exiting.

        An empty `opt_state` ({}, as for converted weights) is left out: orbax refuses empty items.
        """
        items = {"params": ocp.args.StandardSave(flatten(params)), "meta": ocp.args.JsonSave(meta)}
        if flatten(opt_state):
            items["opt_state"] = ocp.args.StandardSave(flatten(opt_state))
        val_loss = meta.get("val_loss")
        metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise self.unreadable(step, e) from None

    def unreadable(self, step: int, error: Exception) -> UserError:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        others = [s for s in self.all_steps() if s != step]
        hint = (f" Other checkpoints here: steps {', '.join(map(str, others))}; choose one with --step "
                "(sample.py, gptjax.load) or move this one aside to resume from the one before."
                if others else "")
        return UserError(f"checkpoint {self.directory / str(step)} cannot be read: it is corrupt or does not "
                         f"match this model ({first_line}).{hint}")

    def restore(self, step: int, params_like, opt_state_like=None):
        """Restore into the structures, and the shardings if they have some, of the given templates (arrays or
        shape/dtype structs)."""
        items = {"params": ocp.args.StandardRestore(_abstract(params_like))}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many kinds; all mean "unusable"
            raise self.unreadable(step, e) from None
        params = unflatten(params_like, restored["params"])
        opt_state = unflatten(opt_state_like, restored["opt_state"]) if opt_state_like is not None else None
        return params, opt_state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def find_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int]:
    """A run directory, its checkpoints/ folder or one step's folder → (run directory, step)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist. Give a run directory (the --out_dir of train.py).")
    if path.name.isdigit() and path.parent.name == CHECKPOINTS:
        if step is not None and step != int(path.name):
            raise UserError(f"{path} is the checkpoint of step {path.name}, not of step {step}.")
        step, path = int(path.name), path.parent.parent
    elif path.name == CHECKPOINTS:
        path = path.parent
    ckpt_dir = path / CHECKPOINTS
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir()) if ckpt_dir.is_dir() else []
    if not steps:
        raise UserError(f"{path} holds no checkpoint (looked in {ckpt_dir}). Train first with "
                        f"`python train.py --out_dir={path}`, or point at another run directory.")
    if step is None or step < 0:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"{path} has no checkpoint of step {step}; it has steps {', '.join(map(str, steps))}.")
    meta = ckpt_dir / str(step) / "meta"
    if not meta.exists():
        raise UserError(f"checkpoint {ckpt_dir / str(step)} is incomplete or corrupt: it has no meta item.")
    return path, step
