"""Context parallelism: CP=2 gives the numbers of CP=1 on the same weights and batch.

As in test_layouts.py, reference weights are built once on one process and saved as a dist
checkpoint; each layout loads them, takes one Adam step on the same global batch through the
real training loop (token-level SFT term on, so both the per-sequence reductions and the
token sums go over the CP group), evaluates, and saves. The saved checkpoints are read back as full
tensors: Adam's first moment after one step is (1 - beta1) x gradient, so comparing it
compares the gradients; the updated parameters and the step's loss and metrics are compared
too. Checkpoints saved at one CP size are then resumed at another and trained one more step.

``test_response_in_one_chunk`` runs the model directly on hand-made pairs whose responses lie
in one CP chunk (so the other rank holds none of their tokens), on CP=2 and on one process.
"""

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from simpo_megatron.testing import run_distributed, tiny_config

pytestmark = pytest.mark.distributed

# name: (TP, PP, CP, micro-batch size, distributed optimizer, layers per virtual pipeline
# stage); global batch 4 pairs throughout.
BY_WORLD = {
    1: {"cp1": (1, 1, 1, 1, False, None)},
    2: {"cp2": (1, 1, 2, 2, False, None), "cp2_4mb": (1, 1, 2, 1, False, None)},
}
# 4 processes on 2 cores: 45-90 s (as loaded), run with -m slow.
SLOW_BY_WORLD = {
    4: {
        "cp2_tp2": (2, 1, 2, 2, False, None),
        "cp2_pp2": (1, 2, 2, 1, False, None),
        "cp2_pp2_vpp2": (1, 2, 2, 1, False, 1),
        "cp2_dp2": (1, 1, 2, 1, False, None),
        "cp2_dp2_distopt": (1, 1, 2, 1, True, None),
    },
}
BASELINE = "cp1"
# Resume runs (world 2): (name, checkpoint to load, TP, PP, CP); each trains a second step.
RESUMES = {
    "cp1_then_dp2": (BASELINE, 1, 1, 1),
    "cp2_then_dp2": ("cp2", 1, 1, 1),
    "cp1_then_cp2": (BASELINE, 1, 1, 2),
}
SEQ_LENGTH = 36  # 4 chunks of 9 at CP=2: pair lengths are mostly not multiples of the chunk


def _config(tp, pp, cp, mbs, **kw):
    return tiny_config(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
        micro_batch_size=mbs, global_batch_size=4, seq_length=SEQ_LENGTH, lr=1e-3, clip_grad=0.0,
        lr_decay_style="constant", adam_eps=1e-2, sft_weight=0.5, log_interval=1, eval_interval=1, eval_iters=1,
        **kw,
    )


def _run(layouts: dict, resumes: dict, root: str, build_reference: bool):
    from megatron.core import parallel_state

    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.checkpointing import save_checkpoint
    from simpo_megatron.training.loop import pretrain
    from simpo_megatron.training.trainer import setup_model_and_optimizer

    ref = os.path.join(root, "reference")
    if build_reference:
        cfg = _config(1, 1, 1, 1)
        initialize_distributed(ParallelLayout(), seed=7)
        save_checkpoint(ref, setup_model_and_optimizer(cfg, cfg.padded_vocab_size()), weights_only=True)
        parallel_state.destroy_model_parallel()
    summaries = {}
    for name, (tp, pp, cp, mbs, distopt, vpp_layers) in layouts.items():
        cfg = _config(tp, pp, cp, mbs, use_distributed_optimizer=distopt, dist_ckpt_optim_fully_reshardable=distopt,
                      num_layers_per_virtual_pipeline_stage=vpp_layers, load=ref, save=os.path.join(root, name),
                      train_iters=1)
        summaries[name] = _summary(pretrain(cfg))
        parallel_state.destroy_model_parallel()
    for name, (source, tp, pp, cp) in resumes.items():
        save = os.path.join(root, name)
        cfg = _config(tp, pp, cp, 1, load=os.path.join(root, source), save=save, train_iters=2)
        summaries[name] = _summary(pretrain(cfg))
        parallel_state.destroy_model_parallel()
    return summaries


def _summary(result: dict) -> dict:
    """The last step's metrics and the last evaluation's (``valid/...``)."""
    return {**(result["train"] or {}), **{f"valid/{k}": v for k, v in (result["valid"] or {}).items()}}


def _full_tensors(ckpt_dir: str, flat_path: str) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(ckpt_dir, flat_path)
    return {k: v for k, v in torch.load(flat_path, weights_only=False).items() if isinstance(v, torch.Tensor)}


def _runs(root, by_world, resumes):
    metrics = {}
    for world, layouts in by_world.items():
        metrics.update(run_distributed(_run, world, layouts, resumes if world == 2 else {}, str(root), world == 1)[-1])
    return metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    metrics = _runs(root, BY_WORLD, RESUMES)
    return root, metrics


_PAIR_METRICS = ("loss", "sft_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "num_pairs")
METRICS = _PAIR_METRICS + ("grad_norm",) + tuple(f"valid/{k}" for k in _PAIR_METRICS)


def _compare(root, metrics, name, base=BASELINE, iteration=1):
    for key in METRICS:
        assert metrics[name][key] == pytest.approx(metrics[base][key], rel=1e-5, abs=1e-6), key
    theirs = _full_tensors(str(root / base / f"iter_{iteration:07d}"), str(root / f"{base}_{iteration}.pt"))
    mine = _full_tensors(str(root / name / f"iter_{iteration:07d}"), str(root / f"{name}_{iteration}.pt"))
    params = [k for k in theirs if not k.startswith("optimizer.")]
    first_moments = [k for k in theirs if k.startswith("optimizer.state.exp_avg.")]
    assert len(first_moments) == len(params) > 5
    for key in first_moments:
        assert theirs[key].abs().max() > 0, key
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-7, msg=key)
    for key in params:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", [n for layouts in BY_WORLD.values() for n in layouts if n != BASELINE])
def test_cp2_equals_cp1(runs, name):
    root, metrics = runs
    assert metrics[BASELINE]["num_pairs"] == 4
    _compare(root, metrics, name)


@pytest.mark.parametrize("name", [n for n in RESUMES if n != "cp1_then_dp2"])
def test_resume_across_cp_sizes(runs, name):
    """A checkpoint saved at CP=2 resumes at CP=1 (and one from CP=1 at CP=2) and trains on
    exactly as CP=1 resumed from its own checkpoint does."""
    root, metrics = runs
    assert metrics[name]["consumed_samples"] == 8
    _compare(root, metrics, name, base="cp1_then_dp2", iteration=2)


@pytest.mark.slow
def test_cp2_with_tp_pp_dp_equals_cp1(tmp_path):
    """CP=2 with TP=2, PP=2, PP=2 interleaved (VPP=2), DP=2 and DP=2 + distributed optimizer
    (4 processes; 45-90 s on 2 cores)."""
    metrics = _runs(tmp_path, {1: BY_WORLD[1], **SLOW_BY_WORLD}, {})
    for name in SLOW_BY_WORLD[4]:
        _compare(tmp_path, metrics, name)


# ------------------------------------------------------------ responses inside one CP chunk
def _one_chunk_pairs():
    """Three pairs at seq 16, that is 4 chunks of 4 at CP=2: rank 0 holds positions 0-3 and
    12-15, rank 1 positions 4-11. Pair 0's responses (their loss-mask positions) lie on rank 1
    only, pair 1's on rank 0 only, pair 2's on both."""
    import numpy as np

    from simpo_megatron.data.pair_dataset import collate_pairs

    def ids(n, start):
        return np.arange(start, start + n, dtype=np.int64)

    samples = [
        {"prompt": ids(5, 3), "chosen": ids(4, 40), "rejected": ids(3, 60)},  # positions 4-7, 4-6
        {"prompt": ids(13, 3), "chosen": ids(3, 80), "rejected": ids(1, 90)},  # 12-14, 12
        {"prompt": ids(2, 3), "chosen": ids(12, 100), "rejected": ids(5, 150)},  # 1-12, 1-5
    ]
    return collate_pairs(samples, 16, pad_id=0)


def _direct(cp: int, batch: dict, seed: int):
    """Loss, per-sequence log-probs and gradients of one micro-batch, on a ``cp``-way split."""
    from functools import partial

    from megatron.core import parallel_state

    from simpo_megatron.model import build_model
    from simpo_megatron.runtime import ParallelLayout, initialize_distributed
    from simpo_megatron.training.step import forward_step

    cfg = tiny_config(context_parallel_size=cp, seq_length=batch["tokens"].shape[1], micro_batch_size=3,
                      global_batch_size=3, sft_weight=0.5, num_layers=2)
    initialize_distributed(ParallelLayout(context_parallel_size=cp), seed=seed)
    (model,) = build_model(cfg.model, cfg.parallel_layout(), cfg.padded_vocab_size())
    output, loss_fn = forward_step(cfg.loss, cfg.model.vocab_size, iter([dict(batch)]), model)
    loss_sum, count, metrics = loss_fn(output)
    loss_sum.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if cp > 1:  # what DDP does over data-parallel x context-parallel ranks
            torch.distributed.all_reduce(g, group=parallel_state.get_context_parallel_group())
        grads[name] = g
    counts = torch.tensor([float(count)])
    if cp > 1:
        torch.distributed.all_reduce(counts, group=parallel_state.get_context_parallel_group())
    parallel_state.destroy_model_parallel()
    return {"loss": loss_sum.detach(), "pairs": counts.item(), "metrics": {k: v.detach() for k, v in metrics.items()},
            "grads": grads}


def _cp2_then_cp1(batch, seed):
    """The same model (same seed) on the same micro-batch split over 2 CP ranks, then whole."""
    return _direct(2, batch, seed), _direct(1, batch, seed)


def test_response_in_one_chunk():
    from simpo_megatron.model.context_parallel import local_positions

    batch = _one_chunk_pairs()
    on_rank = [set(local_positions(16, 2, r).tolist()) for r in (0, 1)]
    where = [set(torch.nonzero(row).flatten().tolist()) for row in batch["loss_mask"]]  # chosen 0-2, rejected 3-5
    assert where[0] <= on_rank[1] and where[3] <= on_rank[1]
    assert where[1] <= on_rank[0] and where[4] <= on_rank[0]
    assert where[2] & on_rank[0] and where[2] & on_rank[1]
    results = run_distributed(_cp2_then_cp1, 2, batch, 11)
    one = results[0][1]
    assert one["pairs"] == results[0][0]["pairs"] == 3
    for rank, _ in results:
        torch.testing.assert_close(rank["loss"], one["loss"], rtol=1e-5, atol=1e-6)
        for key, value in one["metrics"].items():
            torch.testing.assert_close(rank["metrics"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        for key, value in one["grads"].items():
            assert value.abs().max() > 0, key
            torch.testing.assert_close(rank["grads"][key], value, rtol=1e-4, atol=1e-7, msg=key)
