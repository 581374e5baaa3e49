"""--packing end to end on 2 data-parallel ranks: same training step and evaluation as unpacked.

The layout test compares packed and unpacked gradients and updates on every layout; this one
covers what it does not: a step where one rank gets an empty micro-batch (its loss must still
be connected to the graph for backward), and exact resume. Evaluation is padded whatever
--packing says, so the evaluation after the step compares the weights that the packed and the
unpacked step left, not two evaluation paths.
"""

import pytest

from simpo_megatron.testing import run_distributed, tiny_config

# Seed 5's first global batch packs as 1 + 1 + 2 + (empty) pairs on rank 0, 1 + 1 + 1 + 1 on rank 1.
SEED = 5


def _config(**kw):
    settings = dict(
        global_batch_size=8, seed=SEED, train_iters=1, log_interval=1, eval_interval=1, eval_iters=2, clip_grad=0.0
    )
    return tiny_config(**{**settings, **kw})


def _worker(root: str):
    import os

    from megatron.core import parallel_state

    from simpo_megatron.data.provider import build_datasets, global_batches
    from simpo_megatron.training.loop import pretrain

    packed = _config(micro_batch_size=1, packing=True)
    data = build_datasets(packed)
    plan = [b.num_pairs for b in next(global_batches(data.train, packed, data.pad_id, 0, int(os.environ["RANK"]), 2))]
    out = {"plan": plan}
    for name, cfg in (("packed", packed), ("unpacked", _config(micro_batch_size=2))):
        out[name] = pretrain(cfg)
        parallel_state.destroy_model_parallel()
    # Resume: 3 packed steps straight, against 2 steps, save, and 1 more from the checkpoint
    # (constant lr: the 2-step run's schedule would otherwise decay over 2 steps, not 3).
    for name, iters, load in (("straight", 3, None), ("first", 2, None), ("resumed", 3, "resume")):
        cfg = _config(
            micro_batch_size=1,
            packing=True,
            train_iters=iters,
            eval_interval=None,
            lr_decay_style="constant",
            save=os.path.join(root, "straight" if name == "straight" else "resume"),
            load=load and os.path.join(root, load),
        )
        out[name] = pretrain(cfg)["train"]
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("packing")))


def test_a_rank_with_an_empty_micro_batch_trains_like_unpacked(results):
    assert [r["plan"] for r in results] == [[1, 1, 2, 0], [1, 1, 1, 1]]
    packed, unpacked = results[-1]["packed"], results[-1]["unpacked"]
    for phase in ("train", "valid"):
        assert packed[phase]["num_pairs"] == unpacked[phase]["num_pairs"] == (8 if phase == "train" else 16)
        for key, value in unpacked[phase].items():
            if isinstance(value, float):
                assert packed[phase][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (phase, key)


def test_resume_with_packing_is_exact(results):
    straight, resumed = results[-1]["straight"], results[-1]["resumed"]
    assert resumed["consumed_samples"] == straight["consumed_samples"] == 24
    assert resumed == straight
