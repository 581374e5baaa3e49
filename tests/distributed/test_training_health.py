"""Through the real loop: the console line averages its logging window (as Megatron-LM), the
JSONL keeps every iteration, and a health warning goes to both, once per episode."""

import json
import re

import pytest

from simpo_megatron.testing import run_distributed, tiny_config


def _train(metrics_file):
    from simpo_megatron.training.loop import pretrain

    # A fresh model's reward margin is about 0: below 0.5 from the first log interval on.
    return pretrain(
        tiny_config(
            num_layers=2, train_iters=6, log_interval=3, lr=1e-4, health_check_window=1, metrics_file=metrics_file
        )
    )


def test_console_averages_the_window_and_health_warns_once(tmp_path, capfd):
    metrics_file = str(tmp_path / "metrics.jsonl")
    run_distributed(_train, 1, metrics_file)
    out = capfd.readouterr().out
    records = [json.loads(line) for line in open(metrics_file)]
    train = {r["iteration"]: r for r in records if r["split"] == "train"}
    warnings = [r for r in records if r["split"] == "warning"]
    assert sorted(train) == [1, 2, 3, 4, 5, 6]

    lines = {int(m.group(1)): m.group(0) for m in re.finditer(r" iteration\s+(\d+)/6 \|.*", out)}
    assert sorted(lines) == [3, 6]
    for last in (3, 6):
        window = [train[i] for i in range(last - 2, last + 1)]
        for key in ("loss", "rewards/margins", "logps/chosen"):
            shown = float(re.search(rf"\| {key}: ([-\d.e+]+)", lines[last]).group(1))
            mean = sum(r[key] for r in window) / 3
            assert shown == pytest.approx(mean, rel=1e-3), (last, key)
            if abs(window[-1][key] - mean) > 1e-3 * abs(mean):
                assert shown != pytest.approx(window[-1][key], rel=1e-4)  # not the last iteration's

    assert max(abs(r["rewards/margins"]) for r in train.values()) < 0.5
    assert [(w["iteration"], w["check"]) for w in warnings] == [(3, "low_margin")]
    assert "reward margin" in warnings[0]["message"]
    assert out.count("WARNING at iteration 3: reward margin") == 1 and out.count("WARNING") == 1
