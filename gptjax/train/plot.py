"""Loss curves of one or more runs: `gptjax plot RUN_DIR [RUN_DIR ...] [--out=loss.png]`.

Loss curves against steps, tokens and seconds of training, the runs overlaid in one colour each
(train as a line, validation as dots on a dashed line), and a last panel, when the runs scored
zero-shot tasks (--train.eval_tasks), of their accuracies against steps, a marker per figure. The
loss is in bits per UTF-8 byte when every run logged it (tokenizer-independent, so runs of different
tokenizers compare), else in nats per token. Needs matplotlib.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from gptjax import paths

from gptjax.runtime import disk
from gptjax.errors import UserError, cli
from gptjax.train.logs import read_records


MARKERS = "osD^v<>"
SOURCE_FIGURES = ("val_loss/", "val_bpb/", "epochs/")  # a mixture's figures by source, not tasks'


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; give run directories written by train.py.")
    records = read_records(path)
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def task_accuracies(val: list[dict]) -> list[str]:
    """The task figures that are accuracies ('<task>/acc', '<task>/acc_norm'), in order of appearance."""
    return list(dict.fromkeys(k for r in val for k in r if "/" in k and k.rsplit("/", 1)[1].startswith("acc")
                              and not k.startswith(SOURCE_FIGURES)))


def source_names(val: list[dict], val_key: str) -> list[str]:
    """A mixture's sources, whose own validation figures are '<val_key>/<name>', in order of appearance."""
    return list(dict.fromkeys(k.split("/", 1)[1] for r in val for k in r if k.startswith(val_key + "/")))


def plot(run_dirs: list[Path], out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install \"gptjax[plot]\" (or pip install matplotlib).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run_dir, *read_metrics(run_dir)) for run_dir in run_dirs]
    in_bits = all("bpb" in r for _, train, val in runs for r in train) and \
        all("val_bpb" in r for _, _, val in runs for r in val)
    key, val_key, unit = ("bpb", "val_bpb", "bits per byte") if in_bits else ("loss", "val_loss", "nats per token")
    xs = [("step", "optimizer steps"), ("tokens", "training tokens")]
    if all("elapsed_s" in r for _, train, val in runs for r in train + val):
        xs.append(("elapsed_s", "seconds of training"))
    with_tasks = any(task_accuracies(val) for _, _, val in runs)
    panels = len(xs) + with_tasks
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), constrained_layout=True)
    for i, (run_dir, train, val) in enumerate(runs):
        color = f"C{i % 10}"
        for ax, (x, _) in zip(axes, xs):
            ax.plot([r[x] for r in train], [r[key] for r in train], color=color, lw=1.2, alpha=0.85,
                    label=f"{run_dir.name} train")
            ax.plot([r[x] for r in val], [r[val_key] for r in val], color=color, ls="--", marker="o",
                    ms=4, label=f"{run_dir.name} validation")
            for j, name in enumerate(source_names(val, val_key)):  # a mixture: one line per source
                points = [r for r in val if f"{val_key}/{name}" in r]
                ax.plot([r[x] for r in points], [r[f"{val_key}/{name}"] for r in points], color=color, ls=":",
                        marker=MARKERS[(j + 1) % len(MARKERS)], ms=3, alpha=0.8,
                        label=f"{run_dir.name} validation {name}")
        for j, task in enumerate(task_accuracies(val)):
            points = [r for r in val if task in r]
            axes[-1].plot([r["step"] for r in points], [r[task] for r in points], color=color,
                          marker=MARKERS[j % len(MARKERS)], ms=4, label=f"{run_dir.name} {task}")
    for ax, (_, name) in zip(axes, xs):
        ax.set_xlabel(name)
        ax.set_ylabel(f"cross-entropy loss ({unit})")
        ax.set_title(f"loss against {name}")
    if with_tasks:
        axes[-1].set_xlabel("optimizer steps")
        axes[-1].set_ylabel("accuracy")
        axes[-1].set_title("zero-shot tasks against optimizer steps")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
            out = paths.expand(arg.split("=", 1)[1])
        elif arg.startswith("--"):
            raise UserError(f"unknown option {arg}; the only option is --out=FILE.png")
        else:
            runs.append(paths.expand(arg))
    if not runs:
        raise UserError("give at least one run directory: gptjax plot out/run [out/other ...]")
    for run in runs:
        if not run.is_dir():
            raise UserError(f"run directory {run} does not exist.")
    print(plot(runs, out or runs[0] / "loss.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
