"""The launcher as users type it, from a fresh clone.

``bash examples/pretrain_simpo.sh`` with no arguments is the README's main job: it
preprocesses the embedded example data, trains the tiny model on 2 processes with TP=2, and
ends by printing where its checkpoint and metrics are. ``torchrun ... examples/pretrain_simpo.sh``
runs the same file as Python on every rank.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of the committed tree, with the C++ extension that `make setup` builds."""
    import simpo_megatron._pair_builder as ext

    path = tmp_path_factory.mktemp("clone") / "simpo-megatron"
    subprocess.run(["git", "clone", "-q", REPO, str(path)], check=True)
    shutil.copy(ext.__file__, path / "simpo_megatron")
    return path


def test_default_run_from_fresh_clone(clone, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", "examples/pretrain_simpo.sh"], cwd=clone, env=_clean_env(OUTPUT_DIR=str(out)),
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"saved checkpoint {out}/iter_0000100" in proc.stdout
    assert f"metrics: {out}/metrics.jsonl" in proc.stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "100"

    train = IndexedDataset(str(clone / "examples" / "data" / "train_pairs"))
    assert len(train.document_indices) - 1 == 4000 and len(train) == 3 * 4000

    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    valid = {r["iteration"]: r for r in records if r["split"] == "valid"}
    assert valid[0]["rewards/accuracies"] < 0.7
    assert valid[100]["rewards/accuracies"] > 0.8
    assert valid[100]["rewards/margins"] > valid[0]["rewards/margins"] + 1


def test_torchrun_runs_the_launcher_file(clone, tmp_path):
    out = tmp_path / "mock"
    flags = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "64",
             "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--tensor-model-parallel-size", "2", "--train-iters", "2",
             "--log-interval", "1", "--save", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "examples/pretrain_simpo.sh", *flags],
        cwd=clone, env=_clean_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "iteration 2/2" in proc.stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "2"


def test_configuration_error_exits_cleanly(clone):
    proc = subprocess.run(
        ["bash", "examples/pretrain_simpo.sh", "--mock-data", "--tensor-model-parallel-size", "2"],
        cwd=clone, env=_clean_env(GPUS_PER_NODE="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0  # the rank exits 2; torchrun reports any failure as 1
    assert "error: world size 1 is not divisible by --tensor-model-parallel-size (2)" in proc.stderr
    assert "ConfigError" not in proc.stderr  # a message, not a traceback from the trainer
