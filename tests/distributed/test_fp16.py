"""--fp16 with dynamic loss scaling: overflowing steps are skipped while the scaler lowers
the scale, then training proceeds (the scaler must see every overflow to do so)."""

import json

from simpo_megatron.testing import run_distributed, tiny_config


def _train(metrics_file: str):
    from simpo_megatron.training.loop import pretrain

    cfg = tiny_config(
        num_layers=2, fp16=True, initial_loss_scale=2.0**24, train_iters=20, log_interval=5,
        max_skipped_iters=100, metrics_file=metrics_file,
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
    assert train[-1]["lr"] < train[first_update]["lr"]  # the schedule advances on real updates only
