#!/usr/bin/env python3
"""Plot a SimPO run's metrics JSONL: loss, reward accuracy and reward margin over iterations.

The training loop writes one JSON object per line (simpo_megatron/training/monitor.py):
``{"split": "train" | "valid" | "throughput", "iteration": N, "loss": ..., "rewards/accuracies":
..., "rewards/margins": ..., ...}``. This draws three panels, train and valid on each, into a PNG:

    python tools/plot_metrics.py --metrics runs/tiny/metrics.jsonl --output runs/tiny/metrics.png

A run that was resumed appends to the same file, so an iteration can appear twice: the last
record of each (split, iteration) wins. Lines that are not JSON objects (a line cut short when
a run was killed) are skipped with a warning. Needs matplotlib (pip install 'simpo-megatron[plot]').
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

PANELS = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin"),
)
SPLITS = (("train", "-", "train"), ("valid", "o-", "valid"))


def read_metrics(path: str) -> dict[str, dict[int, dict]]:
    """``{split: {iteration: record}}`` from a metrics JSONL (the last record of an iteration wins)."""
    by_split: dict[str, dict[int, dict]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{lineno}: not JSON, skipped", file=sys.stderr)
                continue
            if not isinstance(record, dict) or "split" not in record or "iteration" not in record:
                print(f"warning: {path}:{lineno}: no split/iteration, skipped", file=sys.stderr)
                continue
            by_split.setdefault(str(record["split"]), {})[int(record["iteration"])] = record
    return by_split


def series(records: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    """The (iterations, values) of ``key``, in iteration order, leaving out missing or non-finite values."""
    xs, ys = [], []
    for iteration in sorted(records):
        value = records[iteration].get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(iteration)
            ys.append(float(value))
    return xs, ys


def plot(by_split: dict[str, dict[int, dict]], output: str, title: str | None = None) -> int:
    """Draw the panels into ``output``; returns the number of points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), squeeze=False)
    points = 0
    for ax, (key, label) in zip(axes[0], PANELS):
        for split, style, name in SPLITS:
            xs, ys = series(by_split.get(split, {}), key)
            if xs:
                ax.plot(xs, ys, style, label=name, markersize=4)
                points += len(xs)
        if key == "rewards/accuracies":
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")  # chance
            ax.set_ylim(-0.02, 1.02)
        elif key == "rewards/margins":
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(label)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return points


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", required=True, help="metrics JSONL written by training (--metrics-file)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--title", default=None, help="figure title (default: the metrics file name)")
    args = parser.parse_args(argv)

    try:
        by_split = read_metrics(args.metrics)
    except OSError as e:
        print(f"error: cannot read --metrics {args.metrics}: {e}", file=sys.stderr)
        return 2
    if not any(series(by_split.get(split, {}), key)[0] for split, _, _ in SPLITS for key, _ in PANELS):
        print(
            f"error: {args.metrics} has no train or valid records with {', '.join(k for k, _ in PANELS)}",
            file=sys.stderr,
        )
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install 'simpo-megatron[plot]'", file=sys.stderr)
        return 2
    points = plot(by_split, args.output, args.title or args.metrics)
    counts = ", ".join(f"{split}: {len(by_split.get(split, {}))}" for split, _, _ in SPLITS)
    print(f"wrote {args.output} ({points} points; records {counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
