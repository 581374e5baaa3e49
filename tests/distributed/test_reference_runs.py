"""Reference-based runs end to end: the reference scores are computed once, reused only while
they are valid, refused when damaged, taken from --ref-load, and computable ahead of training.

One tiny random Llama (``make_hf_dir``) and eight preprocessed pairs (``make_pairs``), DPO
(``--loss-type dpo``) from ``--load HF_DIR``, fp32 on gloo processes. On one process, in order:

- an uninterrupted run of N steps, and the same run stopped after K steps and resumed with the
  same --save (the learning-rate decay planned for N steps in both halves); the resumed half
  must read the scores the first half wrote: it says so, the file keeps its inode, mtime and
  bytes, no second file appears;
- a run on the same data and reference with a shorter --seq-length (pairs get truncated):
  it must not reuse the stored file but score afresh into a second file of another key, and
  say on the console why the first one does not serve it;
- ``--ref-load OTHER_HF_DIR`` (other weights) with ``--load HF_DIR``, against a run whose
  ``--load`` is OTHER_HF_DIR: the same scores; and training still starts from HF_DIR's weights;
- a score file with one payload byte flipped: ``loop.main`` stops before training with exit
  code 2 and a message naming the file, no traceback;
- ``simpo-score-reference`` (``cli.score_reference``) ahead of training, then training with the
  same flags: the training run scores nothing;
- ``--load`` = ``--save``, a checkpoint root: fine-tuned from its iteration, then resumed after
  the root moved on; both score with the weights of the iteration it started from.
On two processes (DP=2: each rank scores half of the pairs, one writes), the resume again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import shutil
import struct
import traceback
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file
from test_trl_equivalence import GLOBAL_BATCH, _config, _our_weights, _stream, make_hf_dir, make_pairs, preprocess

from simpo_megatron.testing import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BETA = 0.5
# Steps of the uninterrupted run; the first half stops after K, at the end of the first epoch (8
# pairs, 4 a step), so the resumed half starts the reshuffled second epoch. Step 1's learning
# rate is 0 (warmup), step 2 moves the weights.
N, K = 4, 2
SHORT_SEQ = 16  # shorter than 2 of the 8 pairs (BOS + prompt + the longer response + EOS)
# name -> (world size, TP, micro-batch size); the DP=2 layout scores half of the pairs per rank.
LAYOUTS = {"one_process": (1, 1, 2), "dp2": (2, 1, 1)}
SCORED = "scoring "  # what the console says when the reference pass runs
READ = "reference scores of "  # ... and when it reads stored scores


def _cfg(hf_dir, prefix, save, scores, *, tp=1, mbs=2, **extra):
    return _config(
        hf_dir,
        prefix,
        save,
        tp,
        1,
        mbs,
        False,
        {
            "loss_type": "dpo",
            "beta": BETA,
            "label_smoothing": 0.0,
            "sft_weight": 0.0,
            "train_iters": N,
            "lr_decay_iters": N,
            "ref_scores_dir": scores,
            "metrics_file": os.path.join(save, "metrics.jsonl"),
            **extra,
        },
    )


def _captured(fn, *args):
    """``fn(*args)`` with its stdout and stderr: (value, stdout, stderr); an exception's
    traceback is returned as the value, so that a test can say it was not a clean exit."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            value = fn(*args)
        except Exception:  # noqa: BLE001 - reported to the test
            value = traceback.format_exc()
    return value, out.getvalue(), err.getvalue()


def _files(directory) -> dict[str, tuple[int, int, bytes]]:
    """Every score file under ``directory``: name -> (inode, mtime in ns, bytes)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.refscores"))):
        st = os.stat(path)
        found[os.path.basename(path)] = (st.st_ino, st.st_mtime_ns, Path(path).read_bytes())
    return found


def _pretrain(cfg):
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    try:
        return _captured(pretrain, cfg)
    finally:
        parallel_state.destroy_model_parallel()


def _resume(root: str, hf_dir: str, prefix: str, tp: int, mbs: int) -> dict:
    """The uninterrupted run and the stopped-and-resumed one; what each said and left."""
    import torch.distributed as dist

    scores = os.path.join(root, "scores")
    out = {
        "uninterrupted": _pretrain(
            _cfg(
                hf_dir,
                prefix,
                os.path.join(root, "uninterrupted"),
                os.path.join(root, "scores_uninterrupted"),
                tp=tp,
                mbs=mbs,
            )
        )
    }
    save = os.path.join(root, "resumed")
    out["first"] = _pretrain(
        _cfg(
            hf_dir, prefix, save, scores, tp=tp, mbs=mbs, train_iters=K, metrics_file=os.path.join(save, "first.jsonl")
        )
    )
    out["files_after_first"] = _files(scores)
    dist.barrier()
    out["resumed"] = _pretrain(_cfg(hf_dir, prefix, save, scores, tp=tp, mbs=mbs))
    out["files_after_resume"] = _files(scores)
    return out


def _one_process(root: str, hf_dir: str, other_dir: str, prefix: str) -> dict:
    from simpo_megatron.checkpoint_format import read_tracker
    from simpo_megatron.cli import score_reference
    from simpo_megatron.config.sections import ModelConfig
    from simpo_megatron.training.checkpointing import START_WEIGHTS_KEY, saved_config
    from simpo_megatron.training.loop import main

    _, tp, mbs = LAYOUTS["one_process"]
    out = {"resume": _resume(os.path.join(root, "one_process"), hf_dir, prefix, tp, mbs)}
    scores = os.path.join(root, "one_process", "scores")

    # A shorter --seq-length beside the stored scores of the full length.
    out["short"] = _pretrain(
        _cfg(hf_dir, prefix, os.path.join(root, "short"), scores, seq_length=SHORT_SEQ, train_iters=1)
    )
    out["files_after_short"] = _files(scores)

    # --ref-load OTHER with --load HF_DIR, and --load OTHER.
    out["ref_load"] = _pretrain(
        _cfg(
            hf_dir,
            prefix,
            os.path.join(root, "ref_load"),
            os.path.join(root, "scores_ref_load"),
            ref_load=other_dir,
            train_iters=1,
        )
    )
    out["other"] = _pretrain(
        _cfg(other_dir, prefix, os.path.join(root, "other"), os.path.join(root, "scores_other"), train_iters=1)
    )
    out["stream"] = _stream(_cfg(hf_dir, prefix, os.path.join(root, "stream"), scores))

    # --load and --save one checkpoint root (a copy of the uninterrupted run's, at iteration N):
    # fine-tuned from it for one step, then resumed for one more, each scoring into its own
    # directory. The root's tracker moves on; the reference must stay iteration N's weights.
    same = os.path.join(root, "same_root")
    shutil.copytree(os.path.join(root, "one_process", "uninterrupted"), same)
    # A checkpoint --load takes the model's shape from the flags: the HF model's, as recorded.
    shape = {k: v for k, v in saved_config(same).items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}
    for name, extra in (("same_root_first", {"finetune": True, "train_iters": 1}), ("same_root_resumed", {})):
        scores_dir = os.path.join(root, f"scores_{name}")
        out[name] = _pretrain(_cfg(hf_dir, prefix, same, scores_dir, load=same, **{**shape, "train_iters": 2, **extra}))
    out["same_root_recorded"] = saved_config(same).get(START_WEIGHTS_KEY)
    out["same_root_newest"] = read_tracker(same)

    # The entry points, with their flags in a --config file. main() and score_reference() tear
    # the process group down; the later ones start their own world of one on a free port.
    def flags(name: str) -> list[str]:
        cfg = _cfg(hf_dir, prefix, os.path.join(root, name), os.path.join(root, f"scores_{name}"))
        path = os.path.join(root, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg.to_flat(), f)
        return ["--config", path]

    corrupt = os.path.join(root, "scores_corrupt")
    os.makedirs(corrupt)
    (name,) = out["resume"]["files_after_resume"]
    path = os.path.join(corrupt, name)
    shutil.copy(os.path.join(scores, name), path)
    with open(path, "r+b") as f:
        _, header_length = struct.unpack("<8sQ", f.read(16))
        f.seek(16 + header_length + 3)  # a byte of the first pair's chosen log-prob
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    out["corrupt_path"] = path
    out["corrupt"] = _captured(main, flags("corrupt"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name)

    ahead = flags("ahead")
    out["score_reference"] = _captured(score_reference, ahead)
    out["files_after_scoring"] = _files(os.path.join(root, "scores_ahead"))
    out["ahead"] = _captured(main, ahead)
    out["files_after_training"] = _files(os.path.join(root, "scores_ahead"))
    return out


def _two_processes(root: str, hf_dir: str, prefix: str) -> dict:
    _, tp, mbs = LAYOUTS["dp2"]
    return {"resume": _resume(os.path.join(root, "dp2"), hf_dir, prefix, tp, mbs)}


def _other_weights(hf_dir: str, path: Path) -> str:
    """A copy of ``hf_dir`` with every weight moved: another reference model."""
    import torch
    from safetensors.torch import save_file

    shutil.copytree(hf_dir, path)
    weights = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    save_file(
        {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
        path / "model.safetensors",
        metadata={"format": "pt"},
    )
    return str(path)


def _records(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iteration"]: r for r in rows if r["split"] == "train"}


def _table(path: str) -> np.ndarray:
    from simpo_megatron.data.reference_scores import _read_header, _stored_key, read_reference_scores

    table = read_reference_scores(path, _stored_key(path, _read_header(path)[0]))
    return np.stack([table.chosen_logps, table.rejected_logps, table.chosen_tokens, table.rejected_tokens], 1)


def _key(path: str):
    from simpo_megatron.data.reference_scores import _read_header, _stored_key

    return _stored_key(path, _read_header(path)[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference_runs")
    hf_dir = make_hf_dir(root / "hf")
    other_dir = _other_weights(hf_dir, root / "other_hf")
    prefix = preprocess(make_pairs(), hf_dir, root)
    out = run_distributed(_one_process, 1, str(root), hf_dir, other_dir, prefix)[0]
    out["dp2"] = run_distributed(_two_processes, 2, str(root), hf_dir, prefix)[-1]
    out.update(root=root, hf_dir=hf_dir)
    return out


def _resume_results(runs, layout):
    return runs["resume"] if layout == "one_process" else runs["dp2"]["resume"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resumed_run_equals_the_uninterrupted_one_bitwise(runs, layout):
    d = runs["root"] / layout
    uninterrupted = _records(d / "uninterrupted" / "metrics.jsonl")
    first, resumed = _records(d / "resumed" / "first.jsonl"), _records(d / "resumed" / "metrics.jsonl")
    assert sorted(uninterrupted) == list(range(1, N + 1))
    assert (sorted(first), sorted(resumed)) == (list(range(1, K + 1)), list(range(K + 1, N + 1)))
    for i, record in (first | resumed).items():
        assert record == uninterrupted[i], i  # every float, bit for bit
    assert uninterrupted[N]["loss"] < uninterrupted[1]["loss"]  # it learns
    ours = _our_weights(d / "resumed", runs["hf_dir"], d / "resumed_hf")
    theirs = _our_weights(d / "uninterrupted", runs["hf_dir"], d / "uninterrupted_hf")
    initial = load_file(os.path.join(runs["hf_dir"], "model.safetensors"))
    assert ours.keys() == theirs.keys() == initial.keys()
    for key in theirs:
        assert ours[key].equal(theirs[key]), key
        assert not theirs[key].equal(initial[key]), key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resumed_run_reads_the_stored_scores(runs, layout):
    results = _resume_results(runs, layout)
    first, resumed = results["first"], results["resumed"]
    (name,) = results["files_after_first"]  # the first half scored, into one file
    assert SCORED in first[1] and READ not in first[1]
    assert SCORED not in resumed[1]
    assert f"{READ}" in resumed[1] and name in resumed[1]
    # The same file, untouched: inode, mtime and bytes; no second file.
    assert results["files_after_resume"] == results["files_after_first"]
    # The uninterrupted run scored its own copy: the same key, the same scores.
    (uninterrupted,) = glob.glob(str(runs["root"] / layout / "scores_uninterrupted" / "*.refscores"))
    assert os.path.basename(uninterrupted) == name
    assert Path(uninterrupted).read_bytes() == results["files_after_first"][name][2]


def test_one_and_two_processes_score_the_same(runs):
    (one,) = glob.glob(str(runs["root"] / "one_process" / "scores_uninterrupted" / "*.refscores"))
    (two,) = glob.glob(str(runs["root"] / "dp2" / "scores_uninterrupted" / "*.refscores"))
    assert os.path.basename(one) == os.path.basename(two)  # the layout is not part of the key
    np.testing.assert_allclose(_table(two), _table(one), atol=2e-5, rtol=0)


def test_another_seq_length_scores_afresh_and_says_why(runs):
    before, after = runs["resume"]["files_after_resume"], runs["files_after_short"]
    (stale,) = before
    (fresh,) = set(after) - set(before)
    assert after[stale] == before[stale]  # the stored file is left as it was
    scores = runs["root"] / "one_process" / "scores"
    old, new = _key(str(scores / stale)), _key(str(scores / fresh))
    assert old.seq_length == 32 and dataclasses.replace(old, seq_length=SHORT_SEQ) == new  # only that differs
    stdout = runs["short"][1]
    assert f"not reusing {scores / stale}: sequence length 32 (stored) vs {SHORT_SEQ} (this run)" in stdout
    assert SCORED in stdout and str(scores / fresh) in stdout
    # What was scored changed where the truncation applies: pairs longer than SHORT_SEQ keep
    # their responses (EOS included) and give up prompt tokens, so their log-probs differ.
    short, full = _table(str(scores / fresh)), _table(str(scores / stale))
    np.testing.assert_array_equal(short[:, 2:], full[:, 2:])
    prompts = np.array([1 + len(p["prompt"].split()) for p in make_pairs()])  # BOS + words
    cut = prompts + full[:, 2:].max(1) > SHORT_SEQ
    assert 0 < cut.sum() < len(cut)
    assert (np.abs(short[cut, :2] - full[cut, :2]) > 1e-3).all()
    np.testing.assert_allclose(short[~cut, :2], full[~cut, :2], atol=2e-5, rtol=0)


def test_ref_load_is_the_reference_and_load_the_start(runs):
    root = runs["root"]
    (ref_load,) = glob.glob(str(root / "scores_ref_load" / "*.refscores"))
    (other,) = glob.glob(str(root / "scores_other" / "*.refscores"))
    (hf,) = glob.glob(str(root / "one_process" / "scores_uninterrupted" / "*.refscores"))
    # --ref-load OTHER scores as a run that starts from OTHER: the same key, the same numbers.
    assert os.path.basename(ref_load) == os.path.basename(other) != os.path.basename(hf)
    np.testing.assert_array_equal(_table(ref_load), _table(other))
    assert np.abs(_table(ref_load)[:, :2] - _table(hf)[:, :2]).min() > 1e-3
    # Training starts from HF_DIR's weights: iteration 1's policy log-probs are those of the run
    # without --ref-load, and not those of the run that starts from OTHER.
    with_ref_load = _records(root / "ref_load" / "metrics.jsonl")[1]
    plain = _records(root / "one_process" / "uninterrupted" / "metrics.jsonl")[1]
    from_other = _records(root / "other" / "metrics.jsonl")[1]
    for key in ("logps/chosen", "logps/rejected"):
        assert with_ref_load[key] == plain[key]
        assert abs(with_ref_load[key] - from_other[key]) > 1e-2
    # ... and its rewards are beta x (policy - OTHER's scores) over the step's pairs: at iteration
    # 1 the plain run's policy is its reference (rewards 0), this run's is not.
    batch = [s["index"] for s in runs["stream"][0]]
    assert len(batch) == GLOBAL_BATCH
    table = _table(ref_load)
    for key, column in (("chosen", 0), ("rejected", 1)):
        expected = BETA * (with_ref_load[f"logps/{key}"] - table[batch, column].mean())
        assert with_ref_load[f"rewards/{key}"] == pytest.approx(expected, abs=1e-5)
        assert abs(plain[f"rewards/{key}"]) < 1e-5 < abs(with_ref_load[f"rewards/{key}"])


def test_a_reference_taken_from_a_checkpoint_root_is_its_iteration_directory(runs):
    """A run whose --load is its own --save root records the iteration it started from, so a
    resume after the root moved on scores with the same weights (the same key, the same numbers)."""
    root = runs["root"]
    for name in ("same_root_first", "same_root_resumed"):
        assert not isinstance(runs[name][0], str), runs[name][0]  # no traceback
        assert SCORED in runs[name][1]
    assert runs["same_root_newest"] == 2  # the root itself now names other weights
    assert runs["same_root_recorded"] == str(root / "same_root" / f"iter_{N:07d}")
    (first,) = glob.glob(str(root / "scores_same_root_first" / "*.refscores"))
    (resumed,) = glob.glob(str(root / "scores_same_root_resumed" / "*.refscores"))
    assert os.path.basename(first) == os.path.basename(resumed)
    np.testing.assert_array_equal(_table(resumed), _table(first))
    # ... and those are the trained weights' scores, not the HF start's.
    (hf,) = glob.glob(str(root / "one_process" / "scores_uninterrupted" / "*.refscores"))
    assert np.abs(_table(first)[:, :2] - _table(hf)[:, :2]).max() > 1e-3


def test_a_corrupted_score_file_stops_the_run_with_a_clear_error(runs):
    code, stdout, stderr = runs["corrupt"]
    path = runs["corrupt_path"]
    assert code == 2, code
    assert f"error: {path}: corrupted (checksum mismatch)" in stderr
    assert "Traceback" not in stderr + stdout
    assert SCORED not in stdout  # it neither re-scored nor overwrote the file
    assert not (runs["root"] / "corrupt" / "metrics.jsonl").exists()
    assert not (runs["root"] / "corrupt" / "latest_checkpointed_iteration.txt").exists()


def test_scores_computed_ahead_are_what_training_reads(runs):
    code, stdout, stderr = runs["score_reference"]
    assert code == 0, stderr
    (name,) = runs["files_after_scoring"]
    assert SCORED in stdout
    code, stdout, stderr = runs["ahead"]
    assert code == 0, stderr
    assert SCORED not in stdout and READ in stdout and name in stdout
    assert runs["files_after_training"] == runs["files_after_scoring"]
    assert sorted(_records(runs["root"] / "ahead" / "metrics.jsonl")) == list(range(1, N + 1))
    # The same scores as the training run that scored them itself.
    hf = runs["root"] / "one_process" / "scores_uninterrupted" / name
    np.testing.assert_array_equal(_table(str(runs["root"] / "scores_ahead" / name)), _table(str(hf)))
