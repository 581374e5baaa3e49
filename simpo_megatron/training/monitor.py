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

CONSOLE_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


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
