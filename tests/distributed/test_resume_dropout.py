"""Exact resume with dropout: the RNG states that dropout draws from come back with ``--load``.

Hidden dropout draws from torch's default generator, attention dropout from the tensor-parallel
tracker's model-parallel stream (per TP rank); on the CPU both are the CPU generator's states.
For each layout (TP=2, PP=2, DP=2 on 2 gloo processes) a run of ``ITERS`` iterations is
compared with one that stops after ``STOP`` and resumes with ``--load``: every training record
and the final weights must be equal bitwise. A resume with ``--no-load-rng`` shows that the
losses depend on the dropout draws, so that a lost RNG state would fail the comparison.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from simpo_megatron.testing import run_distributed, tiny_config

pytestmark = pytest.mark.distributed

ITERS, STOP = 6, 3
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}  # (TP, PP) on 2 processes


def _dropout_worker(root: str) -> dict:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU (gloo) path
    from megatron.core import parallel_state

    from simpo_megatron.training import loop

    real_train_step = loop.train_step
    trained = {}

    def train_step(cfg, state, batches):
        trained["state"] = state
        return real_train_step(cfg, state, batches)

    loop.train_step = train_step

    def run(layout: str, name: str, **overrides) -> dict:
        """One run; the model's weights at its end (this rank's shards)."""
        tp, pp = LAYOUTS[layout]
        loop.pretrain(
            tiny_config(
                num_layers=2,
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                hidden_dropout=0.1,
                attention_dropout=0.1,
                lr_decay_iters=ITERS,  # the stopped run follows the full run's schedule
                log_interval=1,
                metrics_file=os.path.join(root, f"{layout}-{name}.jsonl"),
                **overrides,
            )
        )
        parallel_state.destroy_model_parallel()
        chunks = [m.module if hasattr(m, "module") else m for m in trained.pop("state").model]
        return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()}

    weights = {}
    for layout in LAYOUTS:
        save = os.path.join(root, layout)
        weights[layout] = {"full": run(layout, "full", train_iters=ITERS)}
        run(layout, "stopped", train_iters=STOP, save=save)
        weights[layout]["resumed"] = run(layout, "resumed", train_iters=ITERS, load=save)
        run(layout, "fresh_rng", train_iters=STOP + 1, load=save, no_load_rng=True)
    return weights


def _train_records(path: Path) -> dict[int, dict]:
    records = (json.loads(line) for line in path.read_text().splitlines())
    return {r["iteration"]: r for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropout")
    return root, run_distributed(_dropout_worker, 2, str(root))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_with_dropout_is_bitwise_exact(runs, layout):
    root, weights = runs
    full = _train_records(root / f"{layout}-full.jsonl")
    stopped = _train_records(root / f"{layout}-stopped.jsonl")
    resumed = _train_records(root / f"{layout}-resumed.jsonl")
    fresh_rng = _train_records(root / f"{layout}-fresh_rng.jsonl")
    assert sorted(full) == list(range(1, ITERS + 1))
    assert sorted(stopped) == list(range(1, STOP + 1))
    assert sorted(resumed) == list(range(STOP + 1, ITERS + 1))
    for i in stopped:
        assert stopped[i] == full[i], (layout, i)
    for i in resumed:
        # Floats are written with repr, so == compares the bits of every value.
        assert resumed[i] == full[i], (layout, i)
    # Without the saved RNG states the same weights, batch and optimizer state give another
    # loss: the losses depend on the dropout masks.
    assert fresh_rng[STOP + 1]["loss"] != full[STOP + 1]["loss"], layout
    for rank, ranks_weights in enumerate(weights):
        full_w, resumed_w = ranks_weights[layout]["full"], ranks_weights[layout]["resumed"]
        assert full_w.keys() == resumed_w.keys()
        for name, tensor in full_w.items():
            assert tensor.equal(resumed_w[name]), (layout, rank, name)
