"""Loss curves of one or more runs: `python -m gptjax.plot RUN_DIR [RUN_DIR ...] [--out=loss.png]`.

Two panels, train and validation loss against steps and against tokens, the runs overlaid in
one colour each (train as a line, validation as dots on a dashed line); a third, when the runs
scored zero-shot tasks (--train.eval_tasks), their accuracies against steps, a marker per figure.
Needs matplotlib.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptjax.errors import UserError, cli


MARKERS = "osD^v<>"


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; give run directories written by train.py.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def task_accuracies(val: list[dict]) -> list[str]:
    """The task figures that are accuracies ('<task>/acc', '<task>/acc_norm'), in order of appearance."""
    return list(dict.fromkeys(k for r in val for k in r if "/" in k and k.rsplit("/", 1)[1].startswith("acc")))


def plot(run_dirs: list[Path], out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run_dir, *read_metrics(run_dir)) for run_dir in run_dirs]
    with_tasks = any(task_accuracies(val) for _, _, val in runs)
    fig, axes = plt.subplots(1, 3 if with_tasks else 2, figsize=(18 if with_tasks else 12, 4.5),
                             constrained_layout=True)
    for i, (run_dir, train, val) in enumerate(runs):
        color = f"C{i % 10}"
        for ax, x in zip(axes, ("step", "tokens")):
            ax.plot([r[x] for r in train], [r["loss"] for r in train], color=color, lw=1.2, alpha=0.85,
                    label=f"{run_dir.name} train")
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], color=color, ls="--", marker="o",
                    ms=4, label=f"{run_dir.name} validation")
        for j, key in enumerate(task_accuracies(val)):
            points = [r for r in val if key in r]
            axes[2].plot([r["step"] for r in points], [r[key] for r in points], color=color,
                         marker=MARKERS[j % len(MARKERS)], ms=4, label=f"{run_dir.name} {key}")
    for ax, x in zip(axes, ("steps", "tokens")):
        ax.set_xlabel(x)
        ax.set_ylabel("cross-entropy loss (nats per token)")
    if with_tasks:
        axes[2].set_xlabel("steps")
        axes[2].set_ylabel("accuracy")
        axes[2].set_title("zero-shot tasks against optimizer steps")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("loss against optimizer steps")
    axes[1].set_title("loss against training tokens")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


@cli
def main(argv: list[str]) -> None:
    out, runs = None, []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip())
            return
        if arg.startswith("--out="):
            out = Path(arg.split("=", 1)[1])
        elif arg.startswith("--"):
            raise UserError(f"unknown option {arg}; the only option is --out=FILE.png")
        else:
            runs.append(Path(arg))
    if not runs:
        raise UserError("give at least one run directory: python -m gptjax.plot out/run [out/other ...]")
    for run in runs:
        if not run.is_dir():
            raise UserError(f"run directory {run} does not exist.")
    print(plot(runs, out or runs[0] / "loss.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
