"""Exact resume on preprocessed ``.bin/.idx`` data, the tokenizer guard, and checkpoint errors.

A small JSONL is preprocessed with the project's tool and the example SentencePiece model.
One spawned pair of gloo processes then does everything, several checks per spawn:

1. For DP=2 with the distributed optimizer, PP=2, CP=2 with the distributed optimizer (its
   state sharded over the two context-parallel ranks, as megatron-core shards it over data x
   context parallelism), and DP=2 without it: an uninterrupted run
   of N iterations, and a run that stops cleanly at ``--train-iters K`` with ``--save`` and is
   resumed with ``--load`` to N. Every train and validation record of both halves equals the
   uninterrupted run's bitwise (fp32 on the CPU is deterministic, and the records are written
   with ``repr``). The epoch boundary of the data falls after the resume, so the sampler's
   reshuffle is covered too. The resumed half reads the tokenizer from a copy of the model
   file: the same tokenizer at another path is accepted.
2. The real entry ``main([...])`` on set-ups that must be refused: a tokenizer other than the
   one the data was preprocessed with (for the train and for the validation prefix), a tracker
   naming a missing iteration, a garbled or empty tracker, a checkpoint of another model shape
   (hidden size, layer count), and distributed-optimizer state on another layout. Each returns
   exit code 2 on every rank with an error naming the problem (and for the last, what to pass),
   and leaves the checkpoint directory as it was. The remedy it names, no_load_optim, then
   loads the weights on the new layout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import sentencepiece

from simpo_megatron.testing import run_distributed

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SP_MODEL = str(ROOT / "examples" / "data" / "tokenizer.model")
TRACKER = "latest_checkpointed_iteration.txt"
N, K = 6, 3  # iterations in all; where the first half stops
PAIRS = 24  # split 75/25: 18 train pairs, an epoch of 4 global batches of 4; 6 valid pairs

FLAGS = [
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
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--tokenizer-type",
    "SentencePieceTokenizer",
    "--split",
    "75,25,0",
    "--lr",
    "1e-3",
    "--min-lr",
    "1e-4",
    "--lr-warmup-iters",
    "2",
    "--lr-decay-style",
    "cosine",
    # The decay is planned for N iterations, so the first half follows the uninterrupted schedule.
    "--lr-decay-iters",
    str(N),
    "--clip-grad",
    "1.0",
    "--seed",
    "1234",
    "--log-interval",
    "1",
    "--eval-interval",
    "2",
    "--eval-iters",
    "1",
]
LAYOUTS = {
    "dp2_distopt": ["--use-distributed-optimizer"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "cp2_distopt": ["--context-parallel-size", "2", "--use-distributed-optimizer"],
    "dp2": [],
}


# ---------------------------------------------------------------------------- data
def _preprocess(tmp: Path, records: list[dict], prefix: Path, tokenizer: str) -> str:
    from simpo_megatron.data import preprocess

    source = tmp / f"{prefix.name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = [
        "--input",
        str(source),
        "--output-prefix",
        str(prefix),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        tokenizer,
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        assert preprocess.main(argv) == 0
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """The train prefix; another tokenizer (trained here) and a valid prefix written with it."""
    tmp = tmp_path_factory.mktemp("data")
    lines = (ROOT / "examples" / "data" / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[:PAIRS]]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([t for line in lines[:200] for t in json.loads(line).values()]),
        model_writer=model,
        vocab_size=200,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_id=0,
        minloglevel=2,
    )
    other = tmp / "other.model"
    other.write_bytes(model.getvalue())
    copy = tmp / "copy_of_example.model"
    shutil.copyfile(SP_MODEL, copy)
    return {
        "prefix": _preprocess(tmp, records, tmp / "pairs", SP_MODEL),
        "other_prefix": _preprocess(tmp, records[:8], tmp / "other_pairs", str(other)),
        "other_model": str(other),
        "copy_model": str(copy),
    }


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------- the spawned worker
def _quiet(fn, *args):
    """Run ``fn(*args)`` and return (its value, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        value = fn(*args)
    return value, out.getvalue(), err.getvalue()


def _resume(root: str, data: dict) -> dict:
    """Part 1: per layout, the uninterrupted run, the first half and the resumed half."""
    from megatron.core import parallel_state

    from simpo_megatron.config import load_config
    from simpo_megatron.training.loop import pretrain

    def run(flags):
        summary = pretrain(load_config(FLAGS + flags))
        parallel_state.destroy_model_parallel()
        return summary

    out = {}
    for name, layout in LAYOUTS.items():
        d = os.path.join(root, name)
        ckpt = os.path.join(d, "ckpt")
        data_flags = ["--data-path", data["prefix"], "--tokenizer-model", SP_MODEL]
        run([*layout, *data_flags, "--train-iters", str(N), "--metrics-file", os.path.join(d, "uninterrupted.jsonl")])
        run(
            [
                *layout,
                *data_flags,
                "--train-iters",
                str(K),
                "--save",
                ckpt,
                "--metrics-file",
                os.path.join(d, "first.jsonl"),
            ]
        )
        resumed, stdout, _ = _quiet(
            run,
            [
                *layout,
                "--data-path",
                data["prefix"],
                "--tokenizer-model",
                data["copy_model"],
                "--train-iters",
                str(N),
                "--load",
                ckpt,
                "--save",
                ckpt,
                "--metrics-file",
                os.path.join(d, "resumed.jsonl"),
            ],
        )
        out[name] = {"stdout": stdout, "iteration": resumed["iteration"]}
    return out


def _errors(root: str, data: dict) -> dict:
    """Part 2: ``main`` on set-ups that must be refused; each call on a fresh rendezvous port
    (``main`` tears its process group down, and gloo cannot reuse the old store's port)."""
    import torch.distributed as dist

    from simpo_megatron.training.loop import main

    good = os.path.join(root, "dp2_distopt", "ckpt")  # iterations 3 and 6, distributed optimizer
    dirs = {name: os.path.join(root, "errors", name) for name in ("missing", "garbled", "empty")}
    if dist.get_rank() == 0:
        for name, tracker in (("missing", b"9\n"), ("garbled", b"\xff\xfe\x00 6\n"), ("empty", b"")):
            shutil.copytree(good, dirs[name])
            with open(os.path.join(dirs[name], TRACKER), "wb") as f:
                f.write(tracker)
        with open(os.path.join(root, "errors", "no_load_optim.yaml"), "w") as f:
            f.write("no_load_optim: true\n")
    dist.barrier()
    before = {name: _snapshot(d) for name, d in dirs.items()} | {"good": _snapshot(good)}

    data_flags = ["--data-path", data["prefix"], "--tokenizer-model", SP_MODEL]
    cases = {
        "tokenizer": ["--data-path", data["prefix"], "--tokenizer-model", data["other_model"]],
        "valid_tokenizer": [*data_flags, "--valid-data-path", data["other_prefix"]],
        "missing": [*data_flags, "--use-distributed-optimizer", "--load", dirs["missing"], "--save", dirs["missing"]],
        "garbled": [*data_flags, "--use-distributed-optimizer", "--load", dirs["garbled"], "--save", dirs["garbled"]],
        "empty": [*data_flags, "--use-distributed-optimizer", "--load", dirs["empty"], "--save", dirs["empty"]],
        "hidden_size": [
            *data_flags,
            "--use-distributed-optimizer",
            "--hidden-size",
            "32",
            "--ffn-hidden-size",
            "64",
            "--load",
            good,
            "--save",
            good,
        ],
        "num_layers": [*data_flags, "--use-distributed-optimizer", "--num-layers", "1", "--load", good, "--save", good],
        "distopt_tp2": [
            *data_flags,
            "--use-distributed-optimizer",
            "--tensor-model-parallel-size",
            "2",
            "--load",
            good,
            "--save",
            good,
        ],
        # The remedy the refusal names, from a YAML file and as a flag: the weights reshard,
        # the optimizer starts fresh.
        "no_load_optim_yaml": [
            *data_flags,
            "--use-distributed-optimizer",
            "--tensor-model-parallel-size",
            "2",
            "--config",
            os.path.join(root, "errors", "no_load_optim.yaml"),
            "--load",
            good,
        ],
        "no_load_optim_flag": [
            *data_flags,
            "--use-distributed-optimizer",
            "--tensor-model-parallel-size",
            "2",
            "--no-load-optim",
            "--load",
            good,
        ],
    }
    out, rank = {}, dist.get_rank()
    for name, flags in cases.items():
        os.environ["MASTER_PORT"] = str(_agreed_port(os.path.join(root, "errors", f"port_{name}"), rank))
        rc, stdout, stderr = _quiet(main, [*FLAGS, "--train-iters", str(N), *flags])
        out[name] = {"rc": rc, "stdout": stdout, "stderr": stderr}
    return {"cases": out, "before": before, "dirs": dirs | {"good": good}}


def _agreed_port(path: str, rank: int) -> int:
    """A port free right now, picked by rank 0 and read by the others from ``path``.

    Picked just before use (not at the start of the test): a port found free long before can be
    taken meanwhile, e.g. by gloo's own connections, which use ephemeral ports.
    """
    if rank == 0:
        (port,) = _free_ports(1)
        with open(path + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(path + ".tmp", path)
        return port
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"rank 0 never wrote {path}"
        time.sleep(0.05)
    return int(open(path).read())


def _worker(root: str, data: dict) -> dict:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU (gloo) path
    return {"resume": _resume(root, data), "errors": _errors(root, data)}


@pytest.fixture(scope="module")
def results(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("runs")
    ranks = run_distributed(_worker, 2, str(root), data)
    return root, ranks


def _records(path: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["split"] in ("train", "valid"):  # throughput records carry timings
            out[record["split"], record["iteration"]] = record
    return out


# ---------------------------------------------------------------------------- 1. exact resume
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_on_real_data_is_bitwise_exact(results, layout):
    root, ranks = results
    d = root / layout
    uninterrupted = _records(d / "uninterrupted.jsonl")
    first, resumed = _records(d / "first.jsonl"), _records(d / "resumed.jsonl")
    evals = list(range(0, N + 1, 2))
    assert sorted(uninterrupted) == sorted([("train", i) for i in range(1, N + 1)] + [("valid", i) for i in evals])
    assert sorted(first) == sorted([("train", i) for i in range(1, K + 1)] + [("valid", i) for i in evals if i <= K])
    assert sorted(resumed) == sorted(
        [("train", i) for i in range(K + 1, N + 1)] + [("valid", i) for i in evals if i > K]
    )
    for key, record in (first | resumed).items():
        assert record == uninterrupted[key], key  # every float, bit for bit
    # Real pairs from the prefix: losses move, and the run crossed the epoch boundary (18 pairs).
    train = [uninterrupted["train", i] for i in range(1, N + 1)]
    assert len({r["loss"] for r in train}) == N and not any(r["skipped"] for r in train)
    assert train[-1]["consumed_samples"] == 4 * N > 18
    assert uninterrupted["valid", 0]["num_pairs"] == 4
    summary = ranks[-1]["resume"][layout]
    assert summary["iteration"] == N
    assert f"loaded {d / 'ckpt'} at iteration {K}" in summary["stdout"]
    assert (d / "ckpt" / TRACKER).read_text() == str(N)


def test_resume_layouts_differ(results):
    """The cases are different runs (PP=2 initializes and batches differently from DP=2)."""
    root, _ = results
    losses = {name: _records(root / name / "uninterrupted.jsonl")["train", N]["loss"] for name in LAYOUTS}
    assert losses["pp2"] != losses["dp2"]


# ---------------------------------------------------------------------------- 2. refused set-ups
def _refused(results, name: str) -> str:
    """The error message of case ``name``, which must have exited with 2 on every rank."""
    _, ranks = results
    for rank, result in enumerate(ranks):
        case = result["errors"]["cases"][name]
        assert case["rc"] == 2, (rank, name, case["stderr"][-3000:])
    message = ranks[0]["errors"]["cases"][name]["stderr"]
    assert message.startswith("error: "), message
    return message


def _untouched(results, *names: str) -> None:
    _, ranks = results
    errors = ranks[0]["errors"]
    for name in names:
        assert _snapshot(errors["dirs"][name]) == errors["before"][name], name


def test_other_tokenizer_is_refused(results, data):
    message = _refused(results, "tokenizer")
    assert data["prefix"] in message and data["other_model"] in message, message
    message = _refused(results, "valid_tokenizer")
    assert data["other_prefix"] in message and SP_MODEL in message, message


def test_tracker_naming_a_missing_iteration(results):
    root, _ = results
    message = _refused(results, "missing")
    missing = root / "errors" / "missing"
    assert "iteration 9" in message and str(missing / "iter_0000009") in message, message
    _untouched(results, "missing")


@pytest.mark.parametrize("name", ["garbled", "empty"])
def test_garbled_tracker(results, name):
    root, _ = results
    message = _refused(results, name)
    assert str(root / "errors" / name / TRACKER) in message and "iteration number" in message, message
    _untouched(results, name)


@pytest.mark.parametrize("name, flag", [("hidden_size", "--hidden-size"), ("num_layers", "--num-layers")])
def test_checkpoint_of_another_model_shape(results, name, flag):
    root, _ = results
    message = _refused(results, name)
    assert str(root / "dp2_distopt" / "ckpt" / "iter_0000006") in message and flag in message, message
    _untouched(results, "good")


def test_distributed_optimizer_state_on_another_layout(results):
    root, ranks = results
    message = _refused(results, "distopt_tp2")
    assert "--dist-ckpt-optim-fully-reshardable" in message and "--no-load-optim" in message, message
    _untouched(results, "good")
    _loads_without_optimizer_state(results, "no_load_optim_yaml")


def test_no_load_optim_flag_is_the_remedy(results):
    _loads_without_optimizer_state(results, "no_load_optim_flag")


def _loads_without_optimizer_state(results, name: str) -> None:
    root, ranks = results
    remedy = [r["errors"]["cases"][name] for r in ranks]
    assert [c["rc"] for c in remedy] == [0, 0], remedy[0]["stderr"][-3000:]
    assert f"loaded {root / 'dp2_distopt' / 'ckpt'} at iteration {N}" in remedy[-1]["stdout"]
    _untouched(results, "good")
