"""Clear errors with exit code 2 instead of tracebacks, and the CPU notice for --bf16 / --fp16."""

import pytest
import torch

from simpo_megatron.testing import run_distributed, tiny_config
from simpo_megatron.training.loop import precision_notice

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
