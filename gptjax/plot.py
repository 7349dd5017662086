"""Loss curves of one or more runs: `python -m gptjax.plot RUN_DIR [RUN_DIR ...] [--out=loss.png]`.

Two panels, train and validation loss against steps and against tokens, the runs overlaid in
one colour each (train as a line, validation as dots on a dashed line). Needs matplotlib.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from gptjax import disk
from gptjax.errors import UserError, cli
from gptjax.metrics import read_records


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; give run directories written by train.py.")
    records = read_records(path)
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def plot(run_dirs: list[Path], out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for i, run_dir in enumerate(run_dirs):
        train, val = read_metrics(run_dir)
        color = f"C{i % 10}"
        for ax, x in zip(axes, ("step", "tokens")):
            ax.plot([r[x] for r in train], [r["loss"] for r in train], color=color, lw=1.2, alpha=0.85,
                    label=f"{run_dir.name} train")
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], color=color, ls="--", marker="o",
                    ms=4, label=f"{run_dir.name} validation")
    for ax, x in zip(axes, ("steps", "tokens")):
        ax.set_xlabel(x)
        ax.set_ylabel("cross-entropy loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("loss against optimizer steps")
    axes[1].set_title("loss against training tokens")
    png = io.BytesIO()  # drawn in memory first: its size is the space needed, and a full disk keeps no half file
    fig.savefig(png, format=out.suffix.lstrip(".").lower() or "png", dpi=120)
    plt.close(fig)
    with disk.writing(out, "the plot", png.tell(), then="run the same command again, or give --out=FILE.png elsewhere"):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(png.getvalue())
        except OSError:
            out.unlink(missing_ok=True)
            raise
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
