"""--fp16 with dynamic loss scaling: overflowing steps are skipped while the scaler lowers
the scale, then training proceeds (the scaler must see every overflow to do so), and the
learning-rate schedule advances on real updates only."""

import json
import math

from simpo_megatron.testing import run_distributed, tiny_config


def _train(metrics_file: str):
    from simpo_megatron.training.loop import pretrain

    cfg = tiny_config(
        num_layers=2,
        fp16=True,
        initial_loss_scale=2.0**24,
        train_iters=20,
        log_interval=5,
        max_skipped_iters=100,
        metrics_file=metrics_file,
    )
    return pretrain(cfg)


def test_loss_scale_overflows_are_skipped_then_training_proceeds(tmp_path):
    metrics_file = str(tmp_path / "metrics.jsonl")
    run_distributed(_train, 1, metrics_file)
    train = [json.loads(line) for line in open(metrics_file)]
    train = [r for r in train if r["split"] == "train"]
    skipped = [r["skipped"] for r in train]
    assert len(train) == 20
    first_update = skipped.index(False)
    assert first_update >= 1, "a 2**24 loss scale must overflow fp16 gradients at first"
    assert not any(skipped[first_update:]), skipped
    assert all(r["grad_norm"] is not None and r["loss"] is not None for r in train[first_update:])
    # Cosine decay over 20 iterations of 4 pairs, no warmup, min lr 0: after u real updates the
    # lr is 0.5 * lr * (1 + cos(pi * u / 20)); a skipped step leaves it where it was.
    updates = 0
    for record in train:
        updates += not record["skipped"]
        expected = 0.5 * 1e-3 * (1 + math.cos(math.pi * updates / 20))
        assert math.isclose(record["lr"], expected, rel_tol=1e-9, abs_tol=1e-15), (record, updates)
