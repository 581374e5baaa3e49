"""Clear errors with exit code 2 instead of tracebacks, and the CPU notice for --bf16 / --fp16."""

import contextlib
import errno
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from simpo_megatron.testing import run_distributed, tiny_config
from simpo_megatron.training.loop import precision_notice

ROOT = Path(__file__).resolve().parents[2]
SP_MODEL = str(ROOT / "examples" / "data" / "tokenizer.model")

TINY = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--vocab-size",
    "200",
    "--seq-length",
    "32",
    "--train-iters",
    "1",
]


def _mains(argvs):
    from simpo_megatron.training.loop import main

    return [main(argv) for argv in argvs]


def test_data_errors_exit_2_with_a_message(capfd, tmp_path):
    missing = str(tmp_path / "nope")
    codes = run_distributed(
        _mains,
        1,
        [
            # the mock data's 4096 training pairs are fewer than one global batch
            ["--mock-data", "--micro-batch-size", "8", "--global-batch-size", "8192", *TINY],
            [
                "--data-path",
                missing,
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                "examples/data/tokenizer.model",
                *TINY,
            ],
        ],
    )[0]
    err = capfd.readouterr().err
    assert codes == [2, 2]
    assert "error: the training data has 4096 pairs, fewer than one global batch (--global-batch-size 8192)" in err
    assert f"error: dataset prefix {missing!r}: missing" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags, cuda, expected",
    [
        ({"bf16": True}, False, "--bf16 runs on the CPU"),
        ({"fp16": True}, False, "--fp16 runs on the CPU"),
        ({"bf16": True}, True, None),
        ({}, False, None),
    ],
)
def test_precision_notice(flags, cuda, expected):
    notice = precision_notice(tiny_config(**flags), cuda_available=cuda)
    assert (notice is None) if expected is None else (expected in notice and "no GPU is visible" in notice)


def _bf16_run():
    from simpo_megatron.training.loop import pretrain

    return pretrain(tiny_config(num_layers=2, bf16=True, train_iters=2, log_interval=1))["train"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU notice on a machine without a GPU")
def test_bf16_trains_on_the_cpu_and_says_so(capfd):
    train = run_distributed(_bf16_run, 1)[0]
    out = capfd.readouterr().out
    assert "note: no GPU is visible; --bf16 runs on the CPU" in out
    assert train["loss"] is not None and train["loss"] == train["loss"]  # finite, not NaN


# ---------------------------------------------------------------------------- damaged files, a full disk
TRACKER = "latest_checkpointed_iteration.txt"
BATCH = ["--micro-batch-size", "2", "--global-batch-size", "4"]
SAVES = [*TINY[:-2], *BATCH, "--mock-data", "--save-interval", "2"]  # TINY without --train-iters


def _preprocessed(tmp_path) -> str:
    """A small .bin/.idx dataset of the example pairs, tokenized with the example model."""
    from simpo_megatron.data import preprocess

    source = tmp_path / "pairs.jsonl"
    source.write_text("".join((ROOT / "examples" / "data" / "train.jsonl").read_text().splitlines(True)[:16]))
    prefix = str(tmp_path / "pairs")
    argv = ["--input", str(source), "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert preprocess.main([*argv, "--tokenizer-model", SP_MODEL]) == 0
    return prefix


def _overwrite_start(path: str) -> None:
    """Garble ``path`` in place, keeping its size."""
    with open(path, "r+b") as fh:
        fh.write(b"\x00" * 256)


def _damaged_runs(root: str, prefix: str) -> dict:
    """``main`` on damaged checkpoints and datasets, and with a full disk; the exit codes and
    what each leaves in the checkpoint directory."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from simpo_megatron.training.loop import main

    def tracker(save):
        return open(os.path.join(save, TRACKER)).read()

    save = os.path.join(root, "save")
    out = {"first": main([*SAVES, "--train-iters", "2", "--save", save])}
    shard = sorted(f for f in os.listdir(os.path.join(save, "iter_0000002")) if f.endswith(".distcp"))[0]
    damages = {
        "truncated_shard": lambda d: os.truncate(os.path.join(d, shard), os.path.getsize(os.path.join(d, shard)) // 2),
        "garbled_shard": lambda d: _overwrite_start(os.path.join(d, shard)),
        "missing_common": lambda d: os.remove(os.path.join(d, "common.pt")),
    }
    for name, damage in damages.items():
        copy = os.path.join(root, name)
        shutil.copytree(save, copy)
        damage(os.path.join(copy, "iter_0000002"))
        out[name] = main([*SAVES, "--train-iters", "4", "--load", copy])
    for name, ext in (("truncated_bin", ".bin"), ("truncated_idx", ".idx")):
        copy = os.path.join(root, name)
        for suffix in (".bin", ".idx", ".meta.json"):
            if os.path.exists(prefix + suffix):
                shutil.copyfile(prefix + suffix, copy + suffix)
        os.truncate(copy + ext, os.path.getsize(copy + ext) - 16)
        data = ["--data-path", copy, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", SP_MODEL]
        no_vocab = [a for i, a in enumerate(TINY) if "--vocab-size" not in TINY[max(i - 1, 0) : i + 1]]
        out[name] = main([*no_vocab, *BATCH, *data])

    # A full disk while the shards of iteration 4 are written, synchronously and in the background.
    write_item = filesystem_async._write_item

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    filesystem_async._write_item = no_space
    try:
        for name, flags in (("enospc", []), ("enospc_async", ["--async-save"])):
            out[name] = main([*SAVES, "--train-iters", "4", "--load", save, "--save", save, *flags])
            out[f"{name}_tracker"] = tracker(save)
    finally:
        filesystem_async._write_item = write_item
    out["listing"] = sorted(os.listdir(save))
    # The checkpoint the tracker still names loads, and training goes on from it.
    out["resumed"] = main([*SAVES, "--train-iters", "3", "--load", save, "--save", save])
    out["resumed_tracker"] = tracker(save)
    return out | {"shard": shard}


def test_damaged_files_and_a_full_disk_stop_with_a_message_naming_the_file(capfd, tmp_path):
    prefix = _preprocessed(tmp_path)
    out = run_distributed(_damaged_runs, 1, str(tmp_path), prefix)[0]
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert out["first"] == 0
    damaged = ("truncated_shard", "garbled_shard", "missing_common", "truncated_bin", "truncated_idx")
    assert {name: out[name] for name in damaged} == dict.fromkeys(damaged, 2)
    ckpt = "iter_0000002"
    assert f"error: {tmp_path}/truncated_shard/{ckpt}/{out['shard']} is truncated (" in err
    assert f"error: reading {tmp_path}/garbled_shard/{ckpt} failed, its files are damaged" in err
    assert f"error: {tmp_path}/missing_common/{ckpt}/common.pt is missing" in err
    assert f"error: {tmp_path}/truncated_bin.bin: truncated (" in err
    assert f"error: {tmp_path}/truncated_idx.idx: damaged index, truncated (" in err

    save = tmp_path / "save"
    for name in ("enospc", "enospc_async"):
        assert (out[name], out[f"{name}_tracker"]) == (2, "2"), name
    message = (
        f"error: saving the checkpoint {save}/iter_0000004.tmp failed: no space left on device; "
        f"{save}/{TRACKER} still names iteration 2"
    )
    assert err.count(message) == 2
    assert [f for f in out["listing"] if f != "metrics.jsonl"] == [ckpt, TRACKER]  # the partial write is gone
    assert (out["resumed"], out["resumed_tracker"]) == (0, "3")


# ---------------------------------------------------------------------------- a rank that hangs
TIMEOUT_MINUTES = 0.1  # 6 s


def _one_rank_hangs() -> int:
    """``main`` with rank 1 asleep before its first step, past --distributed-timeout-minutes."""
    import time

    import torch.distributed as dist

    from simpo_megatron.training import loop

    step = loop.train_step

    def late_step(*args, **kwargs):
        if dist.get_rank() == 1:
            time.sleep(2 * TIMEOUT_MINUTES * 60)
        return step(*args, **kwargs)

    loop.train_step = late_step
    return loop.main([*TINY, *BATCH, "--mock-data", "--distributed-timeout-minutes", str(TIMEOUT_MINUTES)])


def test_a_rank_that_hangs_stops_the_run_with_a_message_naming_rank_and_collective(capfd):
    codes = run_distributed(_one_rank_hangs, 2)
    err = capfd.readouterr().err
    assert codes == [1, 1], err[-3000:]
    waiting = [line for line in err.splitlines() if line.startswith("error: rank 0 of 2: ")]
    assert len(waiting) == 1, err[-3000:]
    assert "torch.distributed." in waiting[0] and "failed while training iteration 1: " in waiting[0]
    assert "Timed out" in waiting[0] and "raise --distributed-timeout-minutes" in waiting[0]
    assert "error: rank 1 of 2: " in err  # the late rank finds its peer gone, and says so too
    assert "Traceback" not in err
