"""Running unattended, in one process: where a run starts, when it stops early, which
checkpoints it keeps, and the metrics file a resumed run rewinds."""

from __future__ import annotations

import json
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from simpo_megatron.config import ConfigError
from simpo_megatron.testing import tiny_config
from simpo_megatron.training import checkpointing, loop
from simpo_megatron.training.monitor import rewind_metrics_file
from simpo_megatron.training.retention import checkpoints_to_delete, prune_checkpoints, saved_iterations
from simpo_megatron.training.run_control import ExitSignal, RunControl, exit_reason


# ------------------------------------------------------------------------------ stopping early
@pytest.mark.parametrize(
    "args, expected",
    [
        ((5, False, 1.0, None, None), None),
        ((5, True, 1.0, None, None), "exit signal received at iteration 5"),
        ((5, False, 2.5, None, 2.0), "2.50 minutes since the start exceed --exit-duration-in-mins 2"),
        ((5, False, 1.5, None, 2.0), None),
        ((6, False, 0.0, 3, None), "exiting at iteration 6: --exit-interval 3"),
        ((7, False, 0.0, 3, None), None),
    ],
)
def test_exit_reason(args, expected):
    reason = exit_reason(*args)
    assert (reason is None) == (expected is None)
    if expected:
        assert expected in reason


def test_ranks_agree_through_an_all_reduce_max(monkeypatch):
    """Another rank got the signal, or its clock ran past the limit: this rank stops too."""
    others = {"signal": 0.0, "elapsed": 0.0}

    def all_reduce(tensor, op=None):
        assert op == torch.distributed.ReduceOp.MAX
        tensor.copy_(torch.maximum(tensor, torch.tensor([others["signal"], others["elapsed"]], dtype=tensor.dtype)))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    cfg = tiny_config(exit_duration_in_mins=10.0).checkpoint
    control = RunControl(cfg, start_time=time.monotonic())
    try:
        assert control.check(1) is None
        others["elapsed"] = 11.0
        assert "--exit-duration-in-mins 10" in control.check(2)
        others.update(signal=1.0, elapsed=0.0)
        assert control.check(3) == "exit signal received at iteration 3"
    finally:
        control.close()


def test_exit_signal_handler_is_optional():
    before = signal.getsignal(signal.SIGTERM)
    disabled = ExitSignal(enabled=False)
    assert signal.getsignal(signal.SIGTERM) is before
    disabled.restore()
    enabled = ExitSignal(enabled=True)
    try:
        signal.raise_signal(signal.SIGTERM)  # recorded, the process goes on
        assert enabled.received
    finally:
        enabled.restore()
    assert signal.getsignal(signal.SIGTERM) is before


class _Checkpointer:
    def __init__(self):
        self.saves = []

    def save_if_due(self, state):
        pass

    def finalize_async_saves(self, blocking=False):
        return []

    def save_final(self, state):
        self.saves.append(state.iteration)
        return f"iter_{state.iteration}"


class _Monitor:
    metrics_file = None
    last_train = None

    def record_step(self, *args):
        pass


def _train(monkeypatch, cfg, started=None, signal_at=None):
    """loop._train on a stand-in step; the iteration it stopped at and the saves made."""

    def train_step(cfg, state, batches):
        state.iteration += 1
        if state.iteration == signal_at:
            signal.raise_signal(signal.SIGTERM)
        return {}

    monkeypatch.setattr(loop, "train_step", train_step)
    monkeypatch.setattr(loop, "global_batches", lambda *args: iter(lambda: [], None))
    monkeypatch.setattr(loop.parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(loop.parallel_state, "get_data_parallel_world_size", lambda: 1)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None: None)  # a world of one
    state = SimpleNamespace(iteration=0, consumed_samples=0)
    checkpointer = _Checkpointer()
    data = SimpleNamespace(train=None, valid=None, pad_id=0)
    control = RunControl(cfg.checkpoint, time.monotonic() if started is None else started)
    summary = loop._train(cfg, state, data, checkpointer, _Monitor(), control)
    return summary, checkpointer.saves


def test_exit_interval_saves_and_stops(monkeypatch, capsys):
    summary, saves = _train(monkeypatch, tiny_config(train_iters=10, exit_interval=4, save="unused"))
    assert summary["iteration"] == 4 and saves == [4] and summary["interrupted"]
    assert "exiting at iteration 4: --exit-interval 4" in capsys.readouterr().out


def test_exit_duration_saves_and_stops(monkeypatch):
    cfg = tiny_config(train_iters=10, exit_duration_in_mins=1.0)
    summary, saves = _train(monkeypatch, cfg, started=time.monotonic() - 61)  # set-up took a minute
    assert summary["iteration"] == 1 and saves == [1]
    assert "--exit-duration-in-mins 1" in summary["exit_reason"]


def test_sigterm_saves_at_the_iteration_boundary_and_restores_the_handler(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    summary, saves = _train(monkeypatch, tiny_config(train_iters=10), signal_at=3)
    assert summary["iteration"] == 3 and saves == [3]
    assert summary["exit_reason"] == "exit signal received at iteration 3"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_run_that_reaches_train_iters_is_not_interrupted(monkeypatch):
    summary, saves = _train(monkeypatch, tiny_config(train_iters=4, exit_interval=4))
    assert summary["iteration"] == 4 and saves == [4] and not summary["interrupted"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(exit_interval=0), "--exit-interval must be >= 1"),
        (dict(exit_duration_in_mins=0.0), "--exit-duration-in-mins must be > 0"),
        (dict(keep_last_checkpoints=0, save="s"), "--keep-last-checkpoints must be >= 1"),
        (dict(keep_checkpoint_every=5, save="s"), "--keep-checkpoint-every needs --keep-last-checkpoints"),
        (dict(keep_last_checkpoints=2), "--keep-last-checkpoints needs --save"),
    ],
)
def test_bad_flags_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides).validate(1)


# ------------------------------------------------------------------------------ where it starts
@pytest.fixture
def loads(monkeypatch):
    """Checkpointer.start's loads, recorded instead of done."""
    calls = []

    def load_checkpoint(root, state, **flags):
        calls.append((root, flags))
        state.iteration = 6
        return 6

    monkeypatch.setattr(checkpointing, "load_checkpoint", load_checkpoint)
    monkeypatch.setattr(checkpointing, "saved_config", lambda root: {})
    monkeypatch.setattr(checkpointing, "print_rank_last", lambda message: None)
    return calls


def _with_tracker(path, iteration=6):
    os.makedirs(path, exist_ok=True)
    (path / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return str(path)


def test_a_restart_resumes_from_save_without_load(tmp_path, loads):
    save = _with_tracker(tmp_path / "save")
    start = checkpointing.Checkpointer(tiny_config(save=save)).start(SimpleNamespace(iteration=0))
    assert loads == [(save, {})] and start.source == "checkpoint" and start.iteration == 6


def test_save_wins_over_another_load_and_resumes_all_of_it(tmp_path, loads):
    save, other = _with_tracker(tmp_path / "save"), _with_tracker(tmp_path / "other")
    cfg = tiny_config(save=save, load=other, finetune=True, no_load_optim=True)
    checkpointing.Checkpointer(cfg).start(SimpleNamespace(iteration=0))
    assert loads == [(save, {})]  # a full resume: --finetune / --no-load-optim were about --load


def test_load_equal_to_save_keeps_the_load_flags(tmp_path, loads):
    save = _with_tracker(tmp_path / "save")
    cfg = tiny_config(save=save, load=str(tmp_path / "save" / "."), no_load_rng=True)
    checkpointing.Checkpointer(cfg).start(SimpleNamespace(iteration=0))
    assert loads == [(save, {"load_optim": True, "load_rng": False, "finetune": False})]


def test_eval_only_evaluates_load_not_save(tmp_path, loads):
    save, other = _with_tracker(tmp_path / "save"), _with_tracker(tmp_path / "other")
    checkpointing.Checkpointer(tiny_config(save=save, load=other, eval_only=True)).start(SimpleNamespace(iteration=0))
    assert [root for root, _ in loads] == [other]


def test_an_empty_save_starts_from_load(tmp_path, loads):
    other = _with_tracker(tmp_path / "other")
    cfg = tiny_config(save=str(tmp_path / "save"), load=other, finetune=True)
    checkpointing.Checkpointer(cfg).start(SimpleNamespace(iteration=0))
    assert loads == [(other, {"load_optim": True, "load_rng": True, "finetune": True})]


# ------------------------------------------------------------------------------ retention
@pytest.mark.parametrize(
    "keep_last, keep_every, protected, expected",
    [
        (2, None, set(), [2, 4, 6]),
        (1, 4, set(), [2, 6]),
        (1, 4, {6}, [2]),
        (5, None, set(), []),
        (3, 2, set(), []),
    ],
)
def test_checkpoints_to_delete(keep_last, keep_every, protected, expected):
    assert checkpoints_to_delete([2, 4, 6, 8, 10], keep_last, keep_every, protected) == expected


def test_prune_keeps_the_tracked_and_protected_and_finishes_interrupted_removals(tmp_path):
    for i in (2, 4, 6, 8, 10):
        (tmp_path / f"iter_{i:07d}").mkdir()
        (tmp_path / f"iter_{i:07d}" / "shard").write_text("x")
    (tmp_path / "iter_0000012.tmp").mkdir()  # a save under way: not a checkpoint yet
    (tmp_path / ".iter_0000001.deleting").mkdir()  # a removal a crash interrupted
    _with_tracker(tmp_path, 8)  # the tracker names 8: a newer 10 is not complete for it
    deleted = prune_checkpoints(str(tmp_path), keep_last=1, keep_every=None, protected={4})
    assert deleted == [2, 6]
    assert saved_iterations(str(tmp_path)) == [4, 8, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000004",
        "iter_0000008",
        "iter_0000010",
        "iter_0000012.tmp",
        "latest_checkpointed_iteration.txt",
    ]


# ------------------------------------------------------------------------------ metrics file
def test_rewind_drops_the_records_a_resumed_run_redoes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"split": s, "iteration": i} for i in range(0, 6) for s in ("train", "valid")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"split": "train", "itera')  # cut by a kill
    assert rewind_metrics_file(str(path), 3) == 5  # 4 and 5 (twice) and the cut line
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in records if r["iteration"] <= 3]
    assert rewind_metrics_file(str(path), 3) == 0
    assert rewind_metrics_file(str(path), 0) == 8  # a fresh start: nothing of an earlier attempt
    assert path.read_text() == ""
    assert rewind_metrics_file(str(tmp_path / "absent.jsonl"), 3) == 0
