"""Automatic restart: torchrun brings the workers back after one is killed, and the run resumes
by itself from the newest checkpoint in --save, ending exactly where an uninterrupted run ends.

One launch of ``bash examples/pretrain_simpo.sh`` with ``MAX_RESTARTS=1`` on 4 CPU processes
(TP=2 x DP=2): once a step past the second checkpoint is logged, rank 1 (in a tensor-parallel
group and in a data-parallel group) gets SIGKILL mid-run; torchrun stops the other workers and
starts all four again, with no --load. The metrics file must then hold each iteration once,
every record equal (bitwise) to the uninterrupted run's, and so must the final weights.
Retention runs in the same job: only the newest checkpoint, the multiples of 4 and the one the
restart resumed from are left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "examples" / "pretrain_simpo.sh"
TRACKER = "latest_checkpointed_iteration.txt"
TRAIN_ITERS = 10
SAVE_INTERVAL = 2
TIMEOUT = 400  # seconds for one job on a loaded 2-core machine
KILLED_RANK = "1"

FLAGS = [
    "--mock-data",
    *("--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128"),
    *("--num-attention-heads", "4", "--num-query-groups", "2"),
    *("--vocab-size", "200", "--make-vocab-size-divisible-by", "128", "--seq-length", "32"),
    *("--micro-batch-size", "2", "--global-batch-size", "4", "--tensor-model-parallel-size", "2"),
    *("--lr", "1e-3", "--seed", "1234", "--log-interval", "1"),
    *("--train-iters", str(TRAIN_ITERS), "--save-interval", str(SAVE_INTERVAL)),
]


def _launch(save: Path, log: Path, *flags: str, **env) -> subprocess.Popen:
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    environ = {k: v for k, v in os.environ.items() if k not in rendezvous}
    environ.update(
        GPUS_PER_NODE="4",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        **env,
    )
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["bash", str(LAUNCHER), *FLAGS, "--save", str(save), *flags],
            cwd=ROOT,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _tracker(save: Path) -> int | None:
    try:
        return int((save / TRACKER).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _worker(job: subprocess.Popen, rank: str) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(job.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if p.environ().get("RANK") == rank and "pretrain_simpo" in " ".join(p.cmdline()):
                    return p
    return None


def _wait(job: subprocess.Popen, log: Path) -> str:
    try:
        rc = job.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(job.pid, signal.SIGKILL)
        rc = None
    out = log.read_text(errors="replace")
    assert rc == 0, f"exit code {rc}:\n{out[-4000:]}"
    return out


def _final_weights(save: Path) -> dict[str, torch.Tensor]:
    """The model and optimizer tensors of the newest checkpoint, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = save / f"iter_{_tracker(save):07d}"
    flat = save.parent / f"{save.name}.pt"
    dcp_to_torch_save(str(ckpt), str(flat))
    state = torch.load(flat, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run and the killed-and-restarted one, started together."""
    tmp = tmp_path_factory.mktemp("restart")
    ref_save, save = tmp / "reference", tmp / "restarted"
    reference = _launch(ref_save, tmp / "reference.txt")
    restarted = _launch(
        save, tmp / "restarted.txt", "--keep-last-checkpoints", "1", "--keep-checkpoint-every", "4", MAX_RESTARTS="1"
    )
    killed = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while killed is None:
            assert time.monotonic() < deadline and restarted.poll() is None, (tmp / "restarted.txt").read_text()[-4000:]
            done = _tracker(save)
            logged = [r["iteration"] for r in _records(save / "metrics.jsonl") if r["split"] == "train"]
            if done is not None and done >= 2 * SAVE_INTERVAL and logged and max(logged) > done:
                victim = _worker(restarted, KILLED_RANK)
                if victim is not None:
                    killed = {"checkpoint": done, "last_logged": max(logged)}
                    # The rank and its helper processes, as a crash of its node would take them
                    # (a helper left behind would outlive the test).
                    helpers = []
                    with contextlib.suppress(psutil.Error):
                        helpers = victim.children(recursive=True)
                    victim.send_signal(signal.SIGKILL)
                    for helper in helpers:
                        with contextlib.suppress(psutil.Error):
                            helper.kill()
            time.sleep(0.01)
        out = _wait(restarted, tmp / "restarted.txt")
        _wait(reference, tmp / "reference.txt")
    finally:
        for job in (reference, restarted):
            if job.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(job.pid, signal.SIGKILL)
    return {"tmp": tmp, "reference": ref_save, "restarted": save, "killed": killed, "output": out}


def _train_records(save: Path) -> list[dict]:
    return [r for r in _records(save / "metrics.jsonl") if r["split"] == "train"]


def test_restarted_run_resumes_by_itself_and_matches_the_uninterrupted_run(runs):
    save, out, killed = runs["restarted"], runs["output"], runs["killed"]
    # The restart loaded the newest checkpoint of --save (there is no --load) and redid the rest.
    resumed_at = [int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith(f"loaded {save} at")]
    assert len(resumed_at) == 1 and resumed_at[0] >= killed["checkpoint"], out[-4000:]
    reference = _train_records(runs["reference"])
    restarted = _train_records(save)
    # Each iteration once, in order, every value bitwise the uninterrupted run's (floats are
    # written with repr): data position, RNG, optimizer and schedule all came back.
    assert [r["iteration"] for r in restarted] == list(range(1, TRAIN_ITERS + 1))
    assert restarted == reference
    # The killed attempt had logged past its checkpoint: those records were dropped and redone.
    assert killed["last_logged"] > killed["checkpoint"]
    ref_weights, weights = _final_weights(runs["reference"]), _final_weights(save)
    assert ref_weights and sorted(ref_weights) == sorted(weights)
    for key, tensor in ref_weights.items():
        assert torch.equal(weights[key], tensor), key


def test_retention_keeps_the_newest_the_multiples_and_the_resumed_from(runs):
    save, out = runs["restarted"], runs["output"]
    resumed_at = next(int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith(f"loaded {save} at"))
    kept = sorted(int(p.name[5:]) for p in save.iterdir() if p.name.startswith("iter_"))
    assert kept == sorted({4, 8, TRAIN_ITERS, resumed_at}), (kept, resumed_at)
    assert not [p.name for p in save.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert _tracker(save) == TRAIN_ITERS
