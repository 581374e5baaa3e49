"""What a run reports: a console line, a JSONL file, and TensorBoard and Weights & Biases when asked for.

``MetricsProcessor`` is the one object the training loop hands each step's and each
evaluation's results to. It keeps the log window (Megatron-LM's averages over the iterations
since the last console line), throughput, the training-health checks and the count of
consecutive skipped updates, and owns the ``MetricsWriter``, which lives on the rank that holds
the metrics (the last rank: last pipeline stage, metrics already reduced over data-parallel
ranks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any

import torch

from simpo_megatron.fsutil import atomic_write_text
from simpo_megatron.training.step import METRIC_NAMES as CONSOLE_KEYS


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite updates)."""


def start_wandb_run(cfg):
    """A Weights & Biases run for ``cfg`` with its whole config logged once, or None without
    --wandb-project. Local files go to --wandb-save-dir, else SAVE/wandb as Megatron-LM does."""
    log = cfg.logging
    if log.wandb_project is None:
        return None
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("--wandb-project needs the wandb package: pip install 'simpo-megatron[wandb]'") from e
    save_dir = log.wandb_save_dir or (os.path.join(cfg.checkpoint.save, "wandb") if cfg.checkpoint.save else None)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    return wandb.init(project=log.wandb_project, name=log.wandb_exp_name, dir=save_dir, config=dataclasses.asdict(cfg))


class MetricsWriter:
    """Appends one JSON object per record to ``jsonl_path``; mirrors scalars to TensorBoard and to
    a W&B run (as ``split/key`` at step ``iteration``)."""

    def __init__(self, jsonl_path: str | None, tensorboard_dir: str | None = None, wandb_run=None):
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
                    "--tensorboard-dir needs the tensorboard package: pip install 'simpo-megatron[tensorboard]'"
                ) from e
            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        self._wandb = wandb_run

    def write(self, split: str, iteration: int, values: dict[str, Any]) -> None:
        """Append one record; non-finite numbers become null (strict JSON has no NaN)."""
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
        record = {"split": split, "iteration": iteration, **values}
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
        scalars = {f"{split}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, iteration)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=iteration)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def rewind_metrics_file(path: str, iteration: int) -> int:
    """Drop the records of a run's iterations after ``iteration`` (all of them when 0) from the
    JSONL ``path``, atomically; returns how many were dropped.

    A run resumed from the checkpoint of ``iteration`` redoes the iterations after it, so the
    records that a killed run wrote past its last checkpoint (and a line cut short by the kill)
    would otherwise be counted twice. A record of iteration 0 is a fresh run's baseline.
    """
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and iteration > 0 and record["iteration"] <= iteration
            except (json.JSONDecodeError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


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


# The training-health checks, as (name, metric keys, condition on their values, advice).
HEALTH_CHECKS = (
    (
        "low_margin",
        ("rewards/margins",),
        lambda m: m < 0.5,
        "reward margin {rewards/margins:.3g} < 0.5: preferences are not being learned; "
        "increase --beta or --gamma-beta-ratio",
    ),
    (
        "high_margin",
        ("rewards/margins",),
        lambda m: m > 5.0,
        "reward margin {rewards/margins:.3g} > 5.0: the model may be overfitting; reduce --beta or --lr",
    ),
    (
        "very_negative_logps",
        ("logps/chosen", "logps/rejected"),
        lambda c, r: c < -10 and r < -10,
        "mean log-probs chosen {logps/chosen:.3g}, rejected {logps/rejected:.3g} both < -10: the model is not learning",
    ),
    (
        "positive_logps",
        ("logps/chosen", "logps/rejected"),
        lambda c, r: c > 0 or r > 0,
        "mean log-probs chosen {logps/chosen:.3g}, rejected {logps/rejected:.3g} > 0: "
        "numerical instability (a log-prob cannot exceed 0)",
    ),
)
# Margins and the -10 bound are per-token scales: with summed log-probs only the > 0 check holds.
SUMMED_LOGP_CHECKS = ("positive_logps",)


class HealthMonitor:
    """Warns when a training-health check fails ``window`` log intervals in a row.

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
                warnings.append(
                    {
                        "check": name,
                        "message": f"{message} (over the last {self.window} log intervals)",
                        **{key: means[key] for key in keys},
                    }
                )
        return warnings


class MetricsProcessor:
    """The run's reporting: every training step and evaluation goes through here.

    Each step's metrics are written to the metrics file; every ``--log-interval`` iterations
    the window's averages, the health warnings and the throughput (real tokens and token slots,
    summed over data-parallel ranks once per interval) go to the console and the file. A
    skipped update is announced, and ``--max-skipped-iters`` of them in a row raise
    ``TrainingError``. Collective: every rank calls ``record_step`` at every step.
    """

    def __init__(self, cfg, writes: bool, data_parallel_group=None, resumed_at: int | None = None):
        """``resumed_at``: the iteration training starts from; the metrics file's records of later
        iterations are dropped first (``rewind_metrics_file``). None (evaluation only) keeps them."""
        self.cfg = cfg
        save = cfg.checkpoint.save
        self.metrics_file = cfg.logging.metrics_file or (os.path.join(save, "metrics.jsonl") if save else None)
        if writes and self.metrics_file and resumed_at is not None:
            rewind_metrics_file(self.metrics_file, resumed_at)
        self.writer = (
            MetricsWriter(self.metrics_file, cfg.logging.tensorboard_dir, start_wandb_run(cfg)) if writes else None
        )
        self.group = data_parallel_group
        self.window = LogWindow()
        self.health = HealthMonitor(cfg.logging.health_check_window, cfg.loss.average_log_prob)
        self.consecutive_skips = 0
        self.last_train: dict[str, Any] | None = None
        self._reset_throughput()

    def _reset_throughput(self) -> None:
        # This rank's real tokens and token slots: summed over data-parallel ranks when logged.
        self._time, self._tokens, self._slots, self._pairs, self._iters = 0.0, 0, 0, 0, 0

    def record_step(self, iteration: int, consumed_samples: int, result, batches, elapsed: float) -> None:
        """One training step: ``result`` is ``train_step``'s, ``batches`` this rank's micro-batches."""
        self._time += elapsed
        self._tokens += sum(b.num_tokens for b in batches)
        self._slots += sum(b.tokens.numel() for b in batches)
        self._pairs += self.cfg.data.global_batch_size
        self._iters += 1
        self._count_skip(iteration, result["skipped"])
        if result["metrics"] is not None:
            self.last_train = {
                **result["metrics"],
                "lr": result["lr"],
                "grad_norm": result["grad_norm"],
                "skipped": result["skipped"],
                "consumed_samples": consumed_samples,
            }
            self.window.add(result["metrics"], skipped=result["skipped"])
            self._write("train", iteration, self.last_train)
        if iteration % self.cfg.logging.log_interval == 0:
            tokens, slots = self._global_tokens()
            if self.last_train is not None:
                self._log(iteration, tokens, slots)
            self._reset_throughput()

    def record_eval(self, iteration: int, metrics: dict[str, float] | None) -> None:
        """An evaluation's metrics (None off the last pipeline stage)."""
        if self.writer is not None and metrics is not None:
            self.writer.write("valid", iteration, metrics)
            print_rank_last(format_eval_line(iteration, metrics))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _count_skip(self, iteration: int, skipped: bool) -> None:
        limit = self.cfg.optimizer.max_skipped_iters
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if skipped:
            fp16 = self.cfg.model.fp16
            reason = "loss-scale overflow or non-finite gradient" if fp16 else "non-finite loss or gradient"
            print_rank_last(
                f" iteration {iteration}: {reason}, update skipped "
                f"({self.consecutive_skips} in a row, limit --max-skipped-iters {limit})"
            )
        if self.consecutive_skips >= limit:
            raise TrainingError(
                f"{self.consecutive_skips} consecutive iterations had a non-finite loss or gradient "
                f"(--max-skipped-iters {limit}); stopping at iteration {iteration}"
            )

    def _global_tokens(self) -> tuple[int, int]:
        """The window's real tokens and token slots, summed over data-parallel ranks."""
        count = torch.tensor([self._tokens, self._slots], dtype=torch.float64)
        if torch.cuda.is_available():
            count = count.cuda()
        torch.distributed.all_reduce(count, group=self.group)
        return int(count[0].item()), int(count[1].item())

    def _log(self, iteration: int, tokens: int, slots: int) -> None:
        averaged = self.window.means()
        self.window.reset()
        for warning in self.health.update(averaged):
            print_rank_last(f" WARNING at iteration {iteration}: {warning['message']}")
            self._write("warning", iteration, warning)
        throughput = {
            "tokens_per_s": tokens / self._time,  # real tokens, no padding
            "packing_efficiency": tokens / slots,
            "pairs_per_s": self._pairs / self._time,
            "ms_per_iter": 1000 * self._time / self._iters,
            "skipped_iters": self.consecutive_skips,
        }
        self._write("throughput", iteration, throughput)
        line = {**self.last_train, **averaged, **throughput}
        print_rank_last(format_train_line(iteration, self.cfg.optimizer.train_iters, line))

    def _write(self, split: str, iteration: int, values: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(split, iteration, values)


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
