"""Fault tolerance: exact resume after kill -9, crashes during a save, resharding on load,
the non-finite update guard, and SIGTERM.

The launcher tests run the real entry points as a user would (``bash examples/pretrain_simpo.sh``
and ``torchrun ... FILE``) on 2 CPU processes (TP=2) with a tiny mock-data model, and watch the
checkpoint tracker and the metrics JSONL from outside. torchrun starts each worker in a session
of its own, so "kill -9 the job" means SIGKILL to every process group in the launcher's process
tree, as a scheduler that kills the job's cgroup does. The in-process tests (resharding, the
non-finite guard) run ``pretrain`` on spawned gloo processes, several checks per spawn.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from simpo_megatron.testing import run_distributed, tiny_config

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "examples" / "pretrain_simpo.sh"
CRASH_DRIVER = Path(__file__).with_name("crash_during_save.py")
TRACKER = "latest_checkpointed_iteration.txt"
TRAIN_ITERS = 12
SAVE_INTERVAL = 3
TIMEOUT = 240  # seconds for one launch on a loaded 2-core machine

# A 2-layer model on mock pairs, TP=2 over 2 processes: a step takes a fraction of a second.
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
    "--make-vocab-size-divisible-by",
    "128",
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
    "--lr-decay-style",
    "cosine",
    "--clip-grad",
    "1.0",
    "--seed",
    "1234",
    "--log-interval",
    "1",
]


# ---------------------------------------------------------------------------- launcher helpers
def _env(**extra) -> dict:
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.update(
        GPUS_PER_NODE="2",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    env.update(extra)
    return env


class Job:
    """A launcher subprocess in a session of its own; its output goes to ``log``."""

    def __init__(self, argv: list, log: Path, **env):
        self.log = log
        self._seen: set[psutil.Process] = set()
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(a) for a in argv],
            cwd=ROOT,
            env=_env(**env),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        """The launcher and its descendants, with any seen before (orphans once torchrun is gone)."""
        try:
            root = psutil.Process(self.proc.pid)
            self._seen.update([root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
        return [p for p in self._seen if _running(p)]

    def kill9(self) -> None:
        """SIGKILL every process group of the job (torchrun's and each worker's session), and
        wait until every process of it is gone."""
        procs = self.tree()
        groups = set()
        for p in procs:
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(p.pid))
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(30)
        _wait_gone(procs, 30)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"{self.proc.args[:3]} did not end in {timeout} s:\n{self.output()[-4000:]}") from None
        finally:
            self._out.close()

    def close(self) -> None:
        """Leave nothing running (on failures)."""
        if self.proc.poll() is None or self.tree():
            self.kill9()
        self._out.close()


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE  # an orphan waits for init to reap it
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in procs):
        assert time.monotonic() < deadline, f"still running: {[p for p in procs if _running(p)]}"
        time.sleep(0.05)


def _bash(*flags, log: Path, **env) -> Job:
    return Job(["bash", LAUNCHER, *FLAGS, *flags], log, **env)


def _torchrun(script: Path, *flags, log: Path, **env) -> Job:
    torchrun = Path(sys.executable).with_name("torchrun")
    torchrun = [torchrun] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return Job([*torchrun, "--nproc-per-node", "2", "--standalone", script, *FLAGS, *flags], log, **env)


def _finish(job: Job, timeout: float = TIMEOUT) -> str:
    """Wait for a run that must succeed; return its output."""
    rc = job.wait(timeout)
    assert rc == 0, f"exit code {rc}:\n{job.output()[-4000:]}"
    return job.output()


def _tracker(save: Path) -> int | None:
    try:
        return int((save / TRACKER).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _records(path: Path, split: str = "train") -> list[dict]:
    """The complete ``split`` records of a metrics JSONL (a killed writer may leave half a line)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["split"] == split:
            out.append(record)
    return out


def _iter_dirs(save: Path) -> list[str]:
    return sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))


def _poll(predicate, job: Job, what: str, timeout: float = TIMEOUT, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if job.proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {job.proc.returncode}) before {what}:\n{job.output()[-4000:]}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}:\n{job.output()[-4000:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict]:
    """The uninterrupted run: its "train" record of each iteration."""
    tmp = tmp_path_factory.mktemp("reference")
    job = _bash("--train-iters", TRAIN_ITERS, "--metrics-file", tmp / "metrics.jsonl", log=tmp / "log.txt")
    try:
        _finish(job)
    finally:
        job.close()
    records = {r["iteration"]: r for r in _records(tmp / "metrics.jsonl")}
    assert sorted(records) == list(range(1, TRAIN_ITERS + 1))
    assert not any(r["skipped"] for r in records.values())
    return records


def _assert_bitwise_equal(resumed: list[dict], reference: dict[int, dict], first: int) -> None:
    assert [r["iteration"] for r in resumed] == list(range(first, TRAIN_ITERS + 1))
    for record in resumed:
        # Every value (loss, rewards, log-probs, lr, grad norm, consumed samples) survives JSON
        # exactly (floats are written with repr), so == compares the bits.
        assert record == reference[record["iteration"]], record["iteration"]


# ---------------------------------------------------------------------------- 1. kill -9
def _resume_to_end(run, tmp_path, save, resume_at: int, reference) -> None:
    """Resume with --load through the launcher; the rest of the run equals the reference bitwise."""
    job = _bash(*run, "--metrics-file", tmp_path / "resumed.jsonl", log=tmp_path / "resumed.txt")
    try:
        out = _finish(job)
    finally:
        job.close()
    assert f"loaded {save} at iteration {resume_at}" in out
    _assert_bitwise_equal(_records(tmp_path / "resumed.jsonl"), reference, resume_at + 1)
    assert _tracker(save) == TRAIN_ITERS


def test_kill9_mid_run_resumes_bitwise(tmp_path, reference):
    save = tmp_path / "ckpt"
    run = ["--train-iters", TRAIN_ITERS, "--save-interval", SAVE_INTERVAL, "--save", save, "--load", save]
    job = _bash(*run, "--metrics-file", tmp_path / "killed.jsonl", log=tmp_path / "killed.txt")
    try:
        # Past the second checkpoint, with a step logged after it: the kill lands mid-interval
        # (or mid-save), so the killed run leaves records that the resume must redo.
        def past_checkpoint():
            done = _tracker(save)
            logged = [r["iteration"] for r in _records(tmp_path / "killed.jsonl")]
            return done is not None and done >= 2 * SAVE_INTERVAL and logged and max(logged) > done

        _poll(past_checkpoint, job, "a step logged past the second checkpoint")
        job.kill9()
    finally:
        job.close()
    resume_at = _tracker(save)
    killed = [r["iteration"] for r in _records(tmp_path / "killed.jsonl")]
    assert resume_at is not None and 2 * SAVE_INTERVAL <= resume_at < TRAIN_ITERS, (resume_at, killed)
    assert resume_at % SAVE_INTERVAL == 0 and resume_at <= max(killed) < TRAIN_ITERS, (resume_at, killed)
    for record in _records(tmp_path / "killed.jsonl"):
        assert record == reference[record["iteration"]]

    _resume_to_end(run, tmp_path, save, resume_at, reference)
    assert not [d for d in _iter_dirs(save) if d.endswith(".tmp")]


# ---------------------------------------------------------------------------- 2. crash in a save
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, reference):
    save = tmp_path / "ckpt"
    run = ["--train-iters", TRAIN_ITERS, "--save-interval", SAVE_INTERVAL, "--save", save, "--load", save]
    job = _torchrun(
        CRASH_DRIVER,
        *run,
        "--metrics-file",
        tmp_path / "crashed.jsonl",
        log=tmp_path / "crashed.txt",
        CRASH_AT_SAVE="2",
    )
    try:
        rc = job.wait()
    finally:
        job.close()
    out = job.output()
    second = 2 * SAVE_INTERVAL
    assert rc != 0, out[-4000:]
    assert f"killed while saving to {save / f'iter_{second:07d}.tmp'}" in out, out[-4000:]
    # The tracker still names the first checkpoint; the second exists only as its .tmp.
    assert _tracker(save) == SAVE_INTERVAL
    assert _iter_dirs(save) == [f"iter_{SAVE_INTERVAL:07d}", f"iter_{second:07d}.tmp"]
    assert (save / f"iter_{second:07d}.tmp" / "__0_0.distcp").exists()
    assert max(r["iteration"] for r in _records(tmp_path / "crashed.jsonl")) == second

    _resume_to_end(run, tmp_path, save, SAVE_INTERVAL, reference)
    # The stale .tmp was replaced by the real save of that iteration.
    assert _iter_dirs(save) == [f"iter_{i:07d}" for i in range(SAVE_INTERVAL, TRAIN_ITERS + 1, SAVE_INTERVAL)]


# ---------------------------------------------------------------------------- 5. SIGTERM
def test_sigterm_saves_at_iteration_boundary_and_exits(tmp_path):
    save = tmp_path / "ckpt"
    metrics = tmp_path / "metrics.jsonl"
    # Far more iterations than will run, and no --save-interval: only the signal can save.
    job = _bash("--train-iters", 100000, "--save", save, "--metrics-file", metrics, log=tmp_path / "log.txt")
    try:
        _poll(lambda: len(_records(metrics)) >= 2, job, "two training steps")
        assert _tracker(save) is None
        procs = job.tree()
        assert len(procs) >= 3, procs  # torchrun and its 2 workers
        os.killpg(job.proc.pid, signal.SIGTERM)  # the launcher's group: torchrun, which forwards it
        job.wait(90)  # torchrun re-raises the signal after its workers end: the exit code is not 0
        _wait_gone(procs, 30)
    finally:
        job.close()
    out = job.output()
    saved = _tracker(save)
    last = max(r["iteration"] for r in _records(metrics))
    assert saved is not None, out[-4000:]
    assert 2 <= saved == last < 100000, (saved, last)
    assert f"exit signal received at iteration {saved}" in out, out[-4000:]
    assert f"saved checkpoint {save / f'iter_{saved:07d}'}" in out
    assert _iter_dirs(save) == [f"iter_{saved:07d}"]
    assert (save / f"iter_{saved:07d}" / "metadata.json").exists()


# ---------------------------------------------------------------------------- 3. resharding
def _reshard_worker(root: str) -> dict:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU (gloo) path, as the launcher tests
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    results = {}
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        save = os.path.join(root, name)
        common = dict(num_layers=2, global_batch_size=4, micro_batch_size=2, eval_iters=2, log_interval=1)
        saved = pretrain(
            tiny_config(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                train_iters=2,
                eval_interval=2,
                save=save,
                save_interval=2,
                **common,
            )
        )
        parallel_state.destroy_model_parallel()
        loaded = pretrain(tiny_config(eval_only=True, load=save, **common))  # TP=1 PP=1 (DP=2)
        parallel_state.destroy_model_parallel()
        results[name] = {"saved": saved["valid"], "loaded": loaded["valid"], "iteration": loaded["iteration"]}
    return results


def test_checkpoint_reshards_tp2_to_tp1_and_pp2_to_pp1(tmp_path):
    results = run_distributed(_reshard_worker, 2, str(tmp_path))[-1]  # the last rank holds metrics
    for name in ("tp2", "pp2"):
        saved, loaded = results[name]["saved"], results[name]["loaded"]
        assert results[name]["iteration"] == 2
        assert saved is not None and loaded is not None, name
        assert saved["num_pairs"] == loaded["num_pairs"] == 8
        assert set(saved) == set(loaded)
        for key in saved:
            assert loaded[key] == pytest.approx(saved[key], rel=1e-5, abs=1e-6), (name, key)
    # Trained weights, not a fresh start: the two layouts trained differently-initialized models.
    assert results["tp2"]["saved"]["loss"] != results["pp2"]["saved"]["loss"]


# ---------------------------------------------------------------------------- 4. non-finite guard
def _nan_worker(root: str) -> dict:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU (gloo) path, as the launcher tests
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from simpo_megatron.training import loop, step

    real_loss_func, real_train_step = step.loss_func, loop.train_step
    poison = {"iterations": set(), "current": 0}

    def loss_func(settings, vocab_size, labels, loss_mask, output_tensor, **kwargs):
        # NaN logits on rank 0 only: every rank must still skip the same update.
        if poison["current"] in poison["iterations"] and dist.get_rank() == 0:
            output_tensor = output_tensor * float("nan")
        return real_loss_func(settings, vocab_size, labels, loss_mask, output_tensor, **kwargs)

    events = []

    def train_step(cfg, state, batches):
        poison["current"] = state.iteration + 1
        before = [p.detach().clone() for m in state.model for p in m.parameters()]
        result = real_train_step(cfg, state, batches)
        after = [p.detach() for m in state.model for p in m.parameters()]
        events.append(
            {
                "iteration": state.iteration,
                "skipped": result["skipped"],
                "params_changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
                "params_finite": all(bool(torch.isfinite(a).all()) for a in after),
            }
        )
        return result

    step.loss_func, loop.train_step = loss_func, train_step
    common = dict(tensor_model_parallel_size=1, num_layers=2, log_interval=1)  # DP=2
    out = {}

    # One bad step: skipped, then training goes on to the end.
    poison["iterations"] = {3}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = loop.pretrain(
            tiny_config(
                train_iters=5,
                max_skipped_iters=2,
                metrics_file=os.path.join(root, "one.jsonl"),
                **common,
            )
        )
    parallel_state.destroy_model_parallel()
    out["one"] = {"events": list(events), "stdout": stdout.getvalue(), "iteration": summary["iteration"]}

    # Bad from iteration 3 on: stops after --max-skipped-iters consecutive skips.
    events.clear()
    poison["iterations"] = set(range(3, 100))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            loop.pretrain(tiny_config(train_iters=20, max_skipped_iters=3, **common))
            error = None
        except loop.TrainingError as e:
            error = str(e)
    parallel_state.destroy_model_parallel()
    out["stop"] = {"events": list(events), "stdout": stdout.getvalue(), "error": error}
    return out


def test_non_finite_updates_are_skipped_then_training_stops(tmp_path):
    results = run_distributed(_nan_worker, 2, str(tmp_path))
    for rank, result in enumerate(results):
        one = result["one"]
        assert one["iteration"] == 5
        assert [e["iteration"] for e in one["events"]] == [1, 2, 3, 4, 5]
        for e in one["events"]:
            bad = e["iteration"] == 3
            assert e["skipped"] == bad, (rank, e)
            assert e["params_changed"] != bad, (rank, e)  # a skipped update leaves every weight as it was
            assert e["params_finite"], (rank, e)

        stop = result["stop"]
        assert [(e["iteration"], e["skipped"], e["params_changed"]) for e in stop["events"]] == [
            (1, False, True),
            (2, False, True),
            (3, True, False),
            (4, True, False),
            (5, True, False),
        ], rank
        assert stop["error"] is not None and "--max-skipped-iters 3" in stop["error"], stop["error"]
        assert "stopping at iteration 5" in stop["error"]

    last = results[-1]  # the last rank prints and writes metrics
    assert "iteration 3: non-finite loss or gradient, update skipped (1 in a row" in last["one"]["stdout"]
    assert "iteration 5: non-finite loss or gradient, update skipped (3 in a row" in last["stop"]["stdout"]
    records = {r["iteration"]: r for r in _records(tmp_path / "one.jsonl")}
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert [records[i]["skipped"] for i in range(1, 6)] == [False, False, True, False, False]
    assert records[3]["grad_norm"] is None and records[3]["loss"] is None  # NaN is written as null
    assert records[3]["lr"] == records[2]["lr"]  # the scheduler did not advance either
    assert records[4]["consumed_samples"] == 4 * records[1]["consumed_samples"]
