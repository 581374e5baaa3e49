"""--async-save: a crash during a background write leaves the previous checkpoint as the one
--load resumes from, and the resumed asynchronous run ends with the same weights and optimizer
state as an uninterrupted synchronous one.

Two spawned pairs of gloo processes (TP=2, a tiny model, saves at iterations 2 and 4):

1. a synchronous run to iteration 4; then an asynchronous run whose ranks are killed
   (``os._exit``) right after their second background write (iteration 4) has ended, before
   the finalization that publishes it: the tracker must still name iteration 2;
2. the asynchronous run resumed from its own --save to iteration 4.

The final checkpoints are read back with torch's own DCP reader (not this project's loader)
and compared tensor by tensor.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from simpo_megatron.testing import run_distributed

pytestmark = pytest.mark.distributed

TRACKER = "latest_checkpointed_iteration.txt"
CRASH_EXIT_CODE = 17
FLAGS = [
    "--mock-data",
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--ffn-hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--vocab-size",
    "200",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--tensor-model-parallel-size",
    "2",
    "--lr",
    "1e-3",
    "--train-iters",
    "4",
    "--save-interval",
    "2",
    "--log-interval",
    "1",
]


def _run(flags: list[str]) -> tuple[dict, str]:
    from megatron.core import parallel_state

    from simpo_megatron.config import load_config
    from simpo_megatron.training.loop import pretrain

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = pretrain(load_config(FLAGS + flags))
    parallel_state.destroy_model_parallel()
    return summary, out.getvalue()


def _kill_after_second_async_write() -> None:
    """Make the second background write end, then kill this rank before it is finalized."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    schedule = AsyncCallsQueue.schedule_async_request
    calls = []

    def schedule_then_crash(self, request):
        index = schedule(self, request)
        calls.append(index)
        if len(calls) == 2:
            self.async_calls[-1].async_caller.process.join()  # the shards are on disk
            # As a node failure, which takes the rank's helper processes with it (megatron-core's
            # results-queue manager would otherwise outlive the test): no finalization, no clean-up.
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(CRASH_EXIT_CODE)
        return index

    AsyncCallsQueue.schedule_async_request = schedule_then_crash


def _sync_then_crashing_async(root: str) -> None:
    _run(["--save", os.path.join(root, "sync")])
    _kill_after_second_async_write()
    _run(["--save", os.path.join(root, "async"), "--async-save"])


def _resume_async(root: str) -> tuple[int, str]:
    save = os.path.join(root, "async")
    summary, stdout = _run(["--load", save, "--save", save, "--async-save"])
    return summary["iteration"], stdout


def _tensors(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt.parent.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


def test_crash_during_async_write_resumes_from_previous_and_matches_sync(tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(RuntimeError, match=rf"died with exit codes \[{CRASH_EXIT_CODE}, {CRASH_EXIT_CODE}\]"):
        run_distributed(_sync_then_crashing_async, 2, str(root))

    sync, crashed = root / "sync", root / "async"
    assert (sync / TRACKER).read_text() == "4"
    # The killed write is on disk but was never published: --load finds iteration 2.
    assert (crashed / TRACKER).read_text() == "2"
    assert (crashed / "iter_0000002" / "metadata.json").is_file()
    assert not (crashed / "iter_0000004").exists()
    assert any(p.suffix == ".distcp" for p in (crashed / "iter_0000004.tmp").iterdir())

    results = run_distributed(_resume_async, 2, str(root))
    assert [iteration for iteration, _ in results] == [4, 4]
    stdout = results[-1][1]
    assert f"loaded {crashed} at iteration 2" in stdout
    assert f"checkpoint of iteration 4 complete: {crashed / 'iter_0000004'}" in stdout
    assert (crashed / TRACKER).read_text() == "4"
    assert not (crashed / "iter_0000004.tmp").exists()

    expected, got = _tensors(sync / "iter_0000004", tmp_path), _tensors(crashed / "iter_0000004", tmp_path)
    assert any(k.startswith("optimizer.") for k in expected) and "output_layer.weight" in expected
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key
