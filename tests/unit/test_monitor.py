"""Metrics output: strict JSONL records and TensorBoard scalars, and the console line."""

import json
import math

from simpo_megatron.training.monitor import MetricsWriter, format_train_line


def test_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(str(tmp_path / "m" / "metrics.jsonl"), str(tmp_path / "tb"))
    writer.write("train", 1, {"loss": 0.5, "rewards/accuracies": 0.75, "grad_norm": 1.5})
    writer.write("train", 2, {"loss": math.nan, "grad_norm": None, "skipped": True})
    writer.write("valid", 2, {"loss": 0.25})
    writer.close()

    lines = (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict: NaN would not be valid JSON
    assert "NaN" not in "".join(lines)
    assert records[0] == {"split": "train", "iteration": 1, "loss": 0.5, "rewards/accuracies": 0.75, "grad_norm": 1.5}
    assert records[1]["loss"] is None and records[1]["skipped"] is True
    assert records[2] == {"split": "valid", "iteration": 2, "loss": 0.25}

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("valid/loss")] == [(2, 0.25)]
    assert events.Scalars("train/rewards/accuracies")[0].value == 0.75


def test_console_line():
    line = format_train_line(10, 100, {"lr": 1e-4, "loss": 0.693, "grad_norm": None, "rewards/margins": 1.25})
    assert line.startswith(" iteration  10/100 | lr: 0.0001 | loss: 0.693")
    assert "rewards/margins: 1.25" in line and "grad_norm" not in line
