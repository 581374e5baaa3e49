"""Weights & Biases logging through the real loop, in W&B's offline mode.

A tiny run with --wandb-project writes an offline run under --wandb-save-dir; reading back its
``.wandb`` file (a LevelDB-style log of W&B's protobuf records) must give the run's name and
project, the whole config once, and at every iteration the same scalars as the JSONL file
(train, throughput and valid records). The flags' start-up checks are tested without wandb.
"""

import glob
import json
import os
import struct

import pytest

from simpo_megatron.config import ConfigError
from simpo_megatron.testing import run_distributed, tiny_config


def _config(**extra):
    return tiny_config(num_layers=2, train_iters=2, log_interval=1, eval_interval=2, eval_iters=1, **extra)


def _train(cfg):
    from simpo_megatron.training.loop import pretrain

    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_CODE="true")
    return pretrain(cfg)


def _records(path: str):
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then 32 KiB blocks of
    chunks, each ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)``."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_logs_what_the_jsonl_logs(tmp_path):
    pytest.importorskip("wandb")
    save_dir = tmp_path / "wb"
    cfg = _config(
        metrics_file=str(tmp_path / "metrics.jsonl"),
        wandb_project="simpo-test",
        wandb_exp_name="tiny",
        wandb_save_dir=str(save_dir),
    )
    run_distributed(_train, 1, cfg)

    (path,) = glob.glob(str(save_dir / "wandb" / "offline-run-*" / "*.wandb"))
    runs, history = [], {}
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            runs.append(record.run)
        elif kind == "history":
            values = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(values)
    (run,) = runs
    assert (run.project, run.display_name) == ("simpo-test", "tiny")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["model"]["hidden_size"] == 64 and config["model"]["num_layers"] == 2
    assert config["logging"]["wandb_project"] == "simpo-test" and config["optimizer"]["train_iters"] == 2

    expected = {}
    for line in open(tmp_path / "metrics.jsonl"):
        r = json.loads(line)
        for key, value in r.items():
            if key not in ("split", "iteration") and isinstance(value, (int, float)):
                expected.setdefault(r["iteration"], {})[f"{r['split']}/{key}"] = value
    assert sorted(expected) == [0, 1, 2]  # valid at 0 and 2; train and throughput at 1 and 2
    assert {"valid/loss", "throughput/tokens_per_s", "train/rewards/margins"} <= set(expected[2])
    for step, values in expected.items():
        logged = {k: v for k, v in history[step].items() if not k.startswith("_")}
        assert logged.keys() == values.keys(), step
        for key, value in values.items():
            assert logged[key] == pytest.approx(value, rel=1e-6), (step, key)


def test_wandb_flags_checked_at_start(monkeypatch):
    import importlib.util

    with pytest.raises(ConfigError, match="--wandb-exp-name needs --wandb-project"):
        _config(wandb_exp_name="x").validate(1)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"--wandb-project needs the wandb package.*\[wandb\]"):
        _config(wandb_project="p").validate(1)
