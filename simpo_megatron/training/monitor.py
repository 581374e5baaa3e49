"""Metrics output: a console line, a JSONL file, and TensorBoard when asked for.

One ``MetricsWriter`` lives on the rank that holds the metrics (the last rank: last pipeline
stage, metrics already reduced over data-parallel ranks); every other rank gets ``None``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from simpo_megatron.training.step import METRIC_NAMES as CONSOLE_KEYS


class MetricsWriter:
    """Appends one JSON object per record to ``jsonl_path``; mirrors scalars to TensorBoard."""

    def __init__(self, jsonl_path: str | None, tensorboard_dir: str | None = None):
        self.jsonl_path = jsonl_path
        self._file = None
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._file = open(jsonl_path, "a", buffering=1)
        self._tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "--tensorboard-dir needs the tensorboard package: "
                    "pip install 'simpo-megatron[tensorboard]'"
                ) from e
            self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def write(self, split: str, iteration: int, values: dict[str, Any]) -> None:
        """Append one record; non-finite numbers become null (strict JSON has no NaN)."""
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        record = {"split": split, "iteration": iteration, **values}
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"{split}/{key}", value, iteration)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class LogWindow:
    """The training metrics of the iterations since the last console line, averaged.

    As Megatron-LM's ``training_log``: each metric is summed over the window's iterations that
    updated the model (skipped ones are left out) and divided by their number; lr and grad norm
    stay the current values. The JSONL file keeps every iteration.
    """

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._iters = 0

    def add(self, metrics: dict[str, float], skipped: bool = False) -> None:
        if skipped:
            return
        for key in CONSOLE_KEYS:
            if metrics.get(key) is not None:
                self._sums[key] = self._sums.get(key, 0.0) + metrics[key]
        self._iters += 1

    def means(self) -> dict[str, float]:
        """The window's averages (empty when every iteration in it was skipped)."""
        return {key: total / self._iters for key, total in self._sums.items()} if self._iters else {}

    def reset(self) -> None:
        self._sums, self._iters = {}, 0


# The spec's "Debugging" section, as (name, metric keys, condition on their values, advice).
HEALTH_CHECKS = (
    ("low_margin", ("rewards/margins",), lambda m: m < 0.5,
     "reward margin {rewards/margins:.3g} < 0.5: preferences are not being learned; "
     "increase --beta or --gamma-beta-ratio"),
    ("high_margin", ("rewards/margins",), lambda m: m > 5.0,
     "reward margin {rewards/margins:.3g} > 5.0: the model may be overfitting; reduce --beta or --lr"),
    ("very_negative_logps", ("logps/chosen", "logps/rejected"), lambda c, r: c < -10 and r < -10,
     "mean log-probs chosen {logps/chosen:.3g}, rejected {logps/rejected:.3g} both < -10: "
     "the model is not learning"),
    ("positive_logps", ("logps/chosen", "logps/rejected"), lambda c, r: c > 0 or r > 0,
     "mean log-probs chosen {logps/chosen:.3g}, rejected {logps/rejected:.3g} > 0: "
     "numerical instability (a log-prob cannot exceed 0)"),
)
# Margins and the -10 bound are per-token scales: with summed log-probs only the > 0 check holds.
SUMMED_LOGP_CHECKS = ("positive_logps",)


class HealthMonitor:
    """Warns when a training-health check of the spec fails ``window`` log intervals in a row.

    ``update`` takes one log interval's averaged metrics and returns the warnings that start
    there: one per episode (a check that keeps failing does not warn again), re-armed once the
    check passes for an interval. ``window=0`` disables every check.
    """

    def __init__(self, window: int, average_log_prob: bool = True):
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.window = window
        self.checks = [c for c in HEALTH_CHECKS if average_log_prob or c[0] in SUMMED_LOGP_CHECKS]
        self._streak = {name: 0 for name, *_ in self.checks}
        self._warned = {name: False for name, *_ in self.checks}

    def update(self, means: dict[str, float]) -> list[dict[str, Any]]:
        warnings = []
        if not self.window:
            return warnings
        for name, keys, failing, advice in self.checks:
            values = [means.get(key) for key in keys]
            if any(v is None or not math.isfinite(v) for v in values):
                continue  # nothing to judge (a skipped window, or the non-finite guard's business)
            if not failing(*values):
                self._streak[name], self._warned[name] = 0, False
                continue
            self._streak[name] += 1
            if self._streak[name] >= self.window and not self._warned[name]:
                self._warned[name] = True
                message = advice.format(**{key: means[key] for key in keys})
                warnings.append({
                    "check": name,
                    "message": f"{message} (over the last {self.window} log intervals)",
                    **{key: means[key] for key in keys},
                })
        return warnings


def format_train_line(iteration: int, train_iters: int, values: dict[str, Any]) -> str:
    """Megatron-LM style: `` iteration   10/ 100 | lr: ... | loss: ... | ...``."""
    width = len(str(train_iters))
    parts = [f" iteration {iteration:>{width}}/{train_iters}"]
    for key in ("lr", "grad_norm", *CONSOLE_KEYS, "tokens_per_s", "packing_efficiency", "pairs_per_s", "ms_per_iter"):
        value = values.get(key)
        if value is None:
            continue
        parts.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if values.get("skipped_iters"):
        parts.append(f"skipped: {values['skipped_iters']}")
    return " | ".join(parts)


def format_eval_line(iteration: int, values: dict[str, Any]) -> str:
    body = " | ".join(f"{k}: {values[k]:.4g}" for k in CONSOLE_KEYS if k in values)
    return f" validation at iteration {iteration} | {body}"


def print_rank_last(message: str) -> None:
    """Print from the last rank only (where metrics live), flushed."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(message, file=sys.stdout, flush=True)
