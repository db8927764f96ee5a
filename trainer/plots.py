"""PNG training curves from the `metrics.jsonl` files of one or more run folders.

    python -m trainer.plots OUT.png stage1=runs/stage1 stage2=runs/stage2

One panel per run (stage): training loss per step, validation loss as markers when the run logged
one. Matplotlib's Agg backend renders without a display, so it works on cluster nodes and CI.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

TRAIN_KEY = "loss"
VAL_KEYS = ("val_loss", "val/loss", "eval_loss")


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a truncated last line (a run killed mid-write) is ignored."""
    path = Path(path)
    rows = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def curve(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a resumed run may log a step twice: the last value wins."""
    by_step: dict[int, float] = {}
    for row in rows:
        value, step = row.get(key), row.get("step")
        if isinstance(step, int) and isinstance(value, (int, float)) and math.isfinite(value):
            by_step[step] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_runs(runs: dict[str, str | Path], out_png: str | Path,
              events: dict[str, list[tuple[int, str]]] | None = None) -> Path:
    """Draw one panel per run folder (label -> folder with metrics.jsonl), with optional vertical
    markers per panel (label -> [(step, text)], e.g. where a run was interrupted); atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (label, run_dir) in zip(axes[0], runs.items()):
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
        steps, values = curve(rows, TRAIN_KEY)
        if not steps:
            raise ValueError(f"{run_dir}/metrics.jsonl: no '{TRAIN_KEY}' values with a 'step' to plot")
        ax.plot(steps, values, label="train loss", color="tab:blue")
        for key in VAL_KEYS:
            vsteps, vvalues = curve(rows, key)
            if vsteps:
                ax.plot(vsteps, vvalues, "o--", label="validation loss", color="tab:orange")
                break
        for step, text in (events or {}).get(label, []):
            ax.axvline(step, color="gray", linestyle=":", label=text)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, out_png)


def save_figure(fig, out_png: str | Path) -> Path:
    """Write a matplotlib figure as PNG under a temporary name, then rename: a reader never sees
    half a picture, and an earlier one survives a crash. Closes the figure."""
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print("usage: python -m trainer.plots OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]", file=sys.stderr)
        return 2
    runs = dict(a.split("=", 1) for a in argv[1:])
    print(plot_runs(runs, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
