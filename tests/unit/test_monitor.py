"""Metrics output: strict JSONL records and TensorBoard scalars, and the console line."""

import json
import math

import pytest

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


def test_log_window_averages_updated_iterations_like_megatron():
    from simpo_megatron.training.monitor import LogWindow

    window = LogWindow()
    window.add({"loss": 1.0, "rewards/margins": 0.2, "logps/chosen": -2.0, "num_pairs": 8})
    window.add({"loss": 9.0, "rewards/margins": 9.0}, skipped=True)  # skipped: left out
    window.add({"loss": 0.5, "rewards/margins": 0.4, "logps/chosen": -1.0, "num_pairs": 8})
    assert window.means() == {"loss": 0.75, "rewards/margins": pytest.approx(0.3), "logps/chosen": -1.5}
    window.reset()
    assert window.means() == {}
    window.add({"loss": 2.0}, skipped=True)
    assert window.means() == {}


def _healthy(**changes):
    return {"rewards/margins": 1.5, "logps/chosen": -1.5, "logps/rejected": -3.0, **changes}


@pytest.mark.parametrize(
    "bad, check",
    [
        ({"rewards/margins": 0.3}, "low_margin"),
        ({"rewards/margins": 6.0}, "high_margin"),
        ({"logps/chosen": -11.0, "logps/rejected": -12.0}, "very_negative_logps"),
        ({"logps/chosen": 0.01}, "positive_logps"),
    ],
)
def test_health_warns_once_per_episode_after_the_window(bad, check):
    from simpo_megatron.training.monitor import HealthMonitor

    monitor = HealthMonitor(window=3)
    timeline = [
        _healthy(),
        _healthy(**bad),
        _healthy(**bad),
        _healthy(**bad),
        _healthy(**bad),  # episode 1
        _healthy(),  # recovers: re-armed
        _healthy(**bad),
        _healthy(**bad),
        _healthy(**bad),
    ]  # episode 2
    fired = [[w["check"] for w in monitor.update(m)] for m in timeline]
    assert fired == [[], [], [], [check], [], [], [], [], [check]]
    warning = HealthMonitor(window=1).update(_healthy(**bad))[0]
    assert warning["check"] == check and "over the last 1 log intervals" in warning["message"]


def test_health_window_needs_consecutive_intervals_and_very_negative_needs_both_logps():
    from simpo_megatron.training.monitor import HealthMonitor

    monitor = HealthMonitor(window=2)
    low = _healthy(**{"rewards/margins": 0.1})
    assert [monitor.update(m) for m in (low, _healthy(), low)] == [[], [], []]  # never 2 in a row
    # Only one of the two mean log-probs below -10: the check wants both.
    one = _healthy(**{"logps/chosen": -11.0})
    assert HealthMonitor(window=1).update(one) == []
    assert HealthMonitor(window=0).update(low) == []  # disabled
    assert HealthMonitor(window=1).update({}) == []  # nothing to judge (every iteration skipped)


def test_summed_log_probs_keep_only_the_positivity_check():
    from simpo_megatron.training.monitor import HealthMonitor

    summed = HealthMonitor(window=1, average_log_prob=False)
    assert summed.update({"rewards/margins": 40.0, "logps/chosen": -120.0, "logps/rejected": -150.0}) == []
    assert [w["check"] for w in summed.update(_healthy(**{"logps/rejected": 0.5}))] == ["positive_logps"]


def test_metrics_processor_sums_tokens_over_ranks_once_per_log_interval(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import torch

    from simpo_megatron.testing import tiny_config
    from simpo_megatron.training.monitor import MetricsProcessor, TrainingError

    reduces = []

    def all_reduce(tensor, group=None):  # two data-parallel ranks with the same counts
        reduces.append(tensor.tolist())
        tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    cfg = tiny_config(
        log_interval=2, global_batch_size=4, max_skipped_iters=2, metrics_file=str(tmp_path / "metrics.jsonl")
    )
    processor = MetricsProcessor(cfg, writes=True)
    batches = [SimpleNamespace(num_tokens=n, tokens=torch.zeros(2, 8)) for n in (10, 6)]
    metrics = {"loss": 0.5, "rewards/margins": 1.0, "num_pairs": 4}
    step = {"metrics": metrics, "lr": 0.1, "grad_norm": 2.0, "skipped": False}
    processor.record_step(1, 4, step, batches, elapsed=0.25)
    assert reduces == []  # not a log step
    processor.record_step(2, 8, step, batches, elapsed=0.75)
    assert reduces == [[32.0, 64.0]]  # this rank's two steps, reduced once
    skipped = dict(step, skipped=True, grad_norm=None)
    processor.record_step(3, 12, skipped, batches, elapsed=0.5)
    with pytest.raises(TrainingError, match="--max-skipped-iters 2"):
        processor.record_step(4, 16, skipped, batches, elapsed=0.5)
    processor.close()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    throughput = [r for r in records if r["split"] == "throughput"]
    assert throughput == [
        {
            "split": "throughput",
            "iteration": 2,
            "tokens_per_s": 64.0,
            "packing_efficiency": 0.5,
            "pairs_per_s": 8.0,
            "ms_per_iter": 500.0,
            "skipped_iters": 0,
        }
    ]
    train = [r for r in records if r["split"] == "train"]
    assert [(r["iteration"], r["skipped"], r["consumed_samples"]) for r in train] == [
        (1, False, 4),
        (2, False, 8),
        (3, True, 12),
    ]
    out = capsys.readouterr().out
    assert "iteration 3: non-finite loss or gradient, update skipped (1 in a row" in out
    assert " iteration  2/10 | lr: 0.1 | grad_norm: 2 | loss: 0.5" in out
