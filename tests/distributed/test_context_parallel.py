"""Context parallelism: CP=2 gives the numbers of CP=1 on the same weights and batch.

As in test_layouts.py, reference weights are built once on one process and saved as a dist
checkpoint; each layout loads them, takes one Adam step on the same global batch through the
real training loop (token-level SFT term on, so both the per-sequence reductions and the
token sums go over the CP group), evaluates, and saves. The saved checkpoints are read back as full
tensors: Adam's first moment after one step is (1 - beta1) x gradient, so comparing it
compares the gradients; the updated parameters and the step's loss and metrics are compared
too. Checkpoints saved at one CP size are then resumed at another and trained one more step.

``test_response_in_one_chunk`` runs the model directly on hand-made pairs whose responses lie
in one CP chunk (so the other rank holds none of their tokens), on CP=2 and on one process;
``test_packed_cp2_equals_packed_cp1_and_unpacked`` does the same with packed rows (THD), with
sequences shorter than 2 x CP, against packed CP=1 and unpacked CP=1. Packed layouts also run
through the training loop above (``cp1_packed``, ``cp2_packed``: one update against ``cp1``).
"""

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from simpo_megatron.testing import run_distributed, tiny_config

pytestmark = pytest.mark.distributed

# name: (TP, PP, CP, micro-batch size, distributed optimizer, layers per virtual pipeline
# stage, --packing); global batch 4 pairs throughout.
BY_WORLD = {
    1: {"cp1": (1, 1, 1, 1, False, None, False), "cp1_packed": (1, 1, 1, 2, False, None, True)},
    2: {
        "cp2": (1, 1, 2, 2, False, None, False),
        "cp2_4mb": (1, 1, 2, 1, False, None, False),
        "cp2_packed": (1, 1, 2, 2, False, None, True),
    },
}
# 4 processes on 2 cores: 45-90 s (as loaded), run with -m slow.
SLOW_BY_WORLD = {
    4: {
        "cp2_tp2": (2, 1, 2, 2, False, None, False),
        "cp2_pp2": (1, 2, 2, 1, False, None, False),
        "cp2_pp2_vpp2": (1, 2, 2, 1, False, 1, False),
        "cp2_dp2": (1, 1, 2, 1, False, None, False),
        "cp2_dp2_distopt": (1, 1, 2, 1, True, None, False),
        "cp2_pp2_packed": (1, 2, 2, 1, False, None, True),
        "cp2_dp2_packed": (1, 1, 2, 1, False, None, True),
    },
}
BASELINE = "cp1"
# The loss variants at CP=2 (padded or packed) against their own CP=1 run, named "LAYOUT+VARIANT";
# the summed log-probs are whole sequences' only when both the sums and the counts go over the CP group.
VARIANTS = {
    "summed_smoothed": ({"average_log_prob": False, "beta": 0.1, "label_smoothing": 0.2}, "cp2"),
    "hinge": ({"loss_type": "hinge"}, "cp2_packed"),
}
for _variant, (_changes, _name) in VARIANTS.items():
    BY_WORLD[1][f"{BASELINE}+{_variant}"] = (*BY_WORLD[1][BASELINE], _changes)
    BY_WORLD[2][f"{_name}+{_variant}"] = (*BY_WORLD[2][_name], _changes)


def _baseline(name: str) -> str:
    """The CP=1 run that ``name`` is compared with: the one of its loss variant."""
    return BASELINE + name[name.index("+") :] if "+" in name else BASELINE


# Resume runs (world 2): (name, checkpoint to load, TP, PP, CP); each trains a second step.
RESUMES = {
    "cp1_then_dp2": (BASELINE, 1, 1, 1),
    "cp2_then_dp2": ("cp2", 1, 1, 1),
    "cp1_then_cp2": (BASELINE, 1, 1, 2),
}
SEQ_LENGTH = 36  # 4 chunks of 9 at CP=2: pair lengths are mostly not multiples of the chunk


def _config(tp, pp, cp, mbs, **kw):
    return tiny_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        micro_batch_size=mbs,
        global_batch_size=4,
        seq_length=SEQ_LENGTH,
        lr=1e-3,
        clip_grad=0.0,
        lr_decay_style="constant",
        adam_eps=1e-2,
        sft_weight=0.5,
        log_interval=1,
        eval_interval=1,
        eval_iters=1,
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
    for name, (tp, pp, cp, mbs, distopt, vpp_layers, packing, *extra) in layouts.items():
        cfg = _config(
            tp,
            pp,
            cp,
            mbs,
            use_distributed_optimizer=distopt,
            dist_ckpt_optim_fully_reshardable=distopt,
            num_layers_per_virtual_pipeline_stage=vpp_layers,
            load=ref,
            save=os.path.join(root, name),
            train_iters=1,
            packing=packing,
            **(extra[0] if extra else {}),
        )
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


_PAIR_METRICS = (
    "loss",
    "sft_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "num_pairs",
)
METRICS = _PAIR_METRICS + ("grad_norm",) + tuple(f"valid/{k}" for k in _PAIR_METRICS)


def _compare(root, metrics, name, base=BASELINE, iteration=1):
    for key in METRICS:
        # A margin is a difference of rewards, so its rounding error is theirs (the rewards').
        scale = abs(metrics[base][key.replace("margins", "chosen")]) if key.endswith("margins") else 0.0
        assert metrics[name][key] == pytest.approx(metrics[base][key], rel=1e-5, abs=1e-6 + 1e-5 * scale), key
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


@pytest.mark.parametrize("name", [n for layouts in BY_WORLD.values() for n in layouts if n != _baseline(n)])
def test_cp2_equals_cp1(runs, name):
    root, metrics = runs
    assert metrics[_baseline(name)]["num_pairs"] == 4
    _compare(root, metrics, name, base=_baseline(name))


@pytest.mark.parametrize("name", [n for n in RESUMES if n != "cp1_then_dp2"])
def test_resume_across_cp_sizes(runs, name):
    """A checkpoint saved at CP=2 resumes at CP=1 (and one from CP=1 at CP=2) and trains on
    exactly as CP=1 resumed from its own checkpoint does."""
    root, metrics = runs
    assert metrics[name]["consumed_samples"] == 8
    _compare(root, metrics, name, base="cp1_then_dp2", iteration=2)


@pytest.mark.slow
def test_cp2_with_tp_pp_dp_equals_cp1(tmp_path):
    """CP=2 with TP=2, PP=2, PP=2 interleaved (VPP=2), DP=2 and DP=2 + distributed optimizer,
    and packed with PP=2 and DP=2 (4 processes; 60-120 s on 2 cores)."""
    metrics = _runs(tmp_path, {1: BY_WORLD[1], **SLOW_BY_WORLD}, {})
    for name in SLOW_BY_WORLD[4]:
        _compare(tmp_path, metrics, name)


# ------------------------------------------------------------ responses inside one CP chunk
def _ids(n, start):
    import numpy as np

    return np.arange(start, start + n, dtype=np.int64)


def _one_chunk_pairs():
    """Three pairs at seq 16, that is 4 chunks of 4 at CP=2: rank 0 holds positions 0-3 and
    12-15, rank 1 positions 4-11. Pair 0's responses (their loss-mask positions) lie on rank 1
    only, pair 1's on rank 0 only, pair 2's on both."""
    from simpo_megatron.data.batch import BatchLayout, collate

    samples = [
        {"prompt": _ids(5, 3), "chosen": _ids(4, 40), "rejected": _ids(3, 60)},  # positions 4-7, 4-6
        {"prompt": _ids(13, 3), "chosen": _ids(3, 80), "rejected": _ids(1, 90)},  # 12-14, 12
        {"prompt": _ids(2, 3), "chosen": _ids(12, 100), "rejected": _ids(5, 150)},  # 1-12, 1-5
    ]
    return collate(samples, BatchLayout(0, seq_length=16))


def _packed_pairs():
    """Four pairs packed in one row; at CP=2 each sequence is padded to a multiple of 4 and cut
    into 4 chunks of its own (``thd_partition_indices``). Pair 0's responses lie on rank 1 only,
    pair 2's on rank 0 only; pair 1's sequences (3 and 2 tokens) are shorter than 2 x CP, its
    rejected response on rank 0 only; pair 3's responses on both ranks."""
    return [
        {"prompt": _ids(5, 3), "chosen": _ids(2, 40), "rejected": _ids(1, 60)},  # lengths 7, 6 -> 8, 8
        {"prompt": _ids(1, 3), "chosen": _ids(2, 80), "rejected": _ids(1, 90)},  # 3, 2 -> 4, 4
        {"prompt": _ids(13, 3), "chosen": _ids(3, 100), "rejected": _ids(1, 110)},  # 16, 14 -> 16, 16
        {"prompt": _ids(2, 3), "chosen": _ids(12, 120), "rejected": _ids(5, 150)},  # 14, 7 -> 16, 8
    ]


def _packed_batches(samples):
    """The same pairs unpacked (width 16), packed for CP=1, and packed for CP=2 (with a tail)."""
    from simpo_megatron.data.batch import BatchLayout, collate

    return {
        "unpacked": collate(samples, BatchLayout(0, seq_length=16)),
        "packed_cp1": collate(samples, BatchLayout(0, packed=True)),
        "packed_cp2": collate(samples, BatchLayout(0, pad_to_multiple_of=32, packed=True, sequence_multiple_of=4)),
    }


def _direct(cp: int, batch: dict, seed: int):
    """Loss, per-sequence log-probs and gradients of one micro-batch, on a ``cp``-way split."""
    from megatron.core import parallel_state

    from simpo_megatron.model import build_model
    from simpo_megatron.runtime import initialize_distributed
    from simpo_megatron.training.step import forward_step

    cfg = tiny_config(
        context_parallel_size=cp,
        seq_length=16,
        micro_batch_size=batch.num_pairs,
        global_batch_size=batch.num_pairs,
        sft_weight=0.5,
        num_layers=2,
    )
    initialize_distributed(cfg.parallel_layout(), seed=seed)
    (model,) = build_model(cfg.model, cfg.parallel_layout(), cfg.padded_vocab_size())
    output, loss_fn = forward_step(cfg.loss, cfg.model.vocab_size, iter([batch]), model)
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
    return {
        "loss": loss_sum.detach(),
        "pairs": counts.item(),
        "metrics": {k: v.detach() for k, v in metrics.items()},
        "grads": grads,
    }


def _direct_runs(unpacked, packed, seed):
    """The same model (same seed) on the same pairs: split over 2 CP ranks and whole, unpacked
    and packed."""
    return {
        "cp2": _direct(2, unpacked, seed),
        "cp1": _direct(1, unpacked, seed),
        "packed_cp2": _direct(2, packed["packed_cp2"], seed),
        "packed_cp1": _direct(1, packed["packed_cp1"], seed),
        "packed_unpacked": _direct(1, packed["unpacked"], seed),
    }


@pytest.fixture(scope="module")
def direct():
    return run_distributed(_direct_runs, 2, _one_chunk_pairs(), _packed_batches(_packed_pairs()), 11)


def _assert_same(mine, ref, pairs):
    assert mine["pairs"] == ref["pairs"] == pairs
    torch.testing.assert_close(mine["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    assert mine["metrics"].keys() == ref["metrics"].keys()
    for key, value in ref["metrics"].items():
        torch.testing.assert_close(mine["metrics"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert mine["grads"].keys() == ref["grads"].keys()
    for key, value in ref["grads"].items():
        assert value.abs().max() > 0, key
        # Rounding differs with the summation order (packed rows, CP chunks): an element's
        # difference is bounded relative to its tensor's scale, not its own (a near-zero element
        # can differ by more than 1e-4 of itself, as seen on a gradient element of 1e-3 in a
        # tensor of 1e-1).
        atol = 1e-6 * value.abs().max().item()
        torch.testing.assert_close(
            mine["grads"][key], value, rtol=1e-4, atol=atol, msg=lambda m, key=key: f"{key}\n{m}"
        )


def test_response_in_one_chunk(direct):
    from simpo_megatron.model.context_parallel import local_positions

    batch = _one_chunk_pairs()
    on_rank = [set(local_positions(16, 2, r).tolist()) for r in (0, 1)]
    where = [set(torch.nonzero(row).flatten().tolist()) for row in batch.loss_mask]  # chosen 0-2, rejected 3-5
    assert where[0] <= on_rank[1] and where[3] <= on_rank[1]
    assert where[1] <= on_rank[0] and where[4] <= on_rank[0]
    assert where[2] & on_rank[0] and where[2] & on_rank[1]
    for rank in direct:
        _assert_same(rank["cp2"], direct[0]["cp1"], pairs=3)


def test_packed_cp2_equals_packed_cp1_and_unpacked(direct):
    """Packed at CP=2 (sequences padded to multiples of 4, each split into 4 chunks) gives the
    loss, metrics and gradients of packed CP=1 and of unpacked CP=1, on every rank; including a
    pair whose responses lie in one rank's chunks and sequences shorter than 2 x CP."""
    from simpo_megatron.model.context_parallel import thd_partition_indices

    batch = _packed_batches(_packed_pairs())["packed_cp2"]
    mask, seq = batch.loss_mask[0], batch.packed.segment_ids[0]
    ranks_of = {}  # sequence -> the CP ranks holding its response tokens
    for rank in (0, 1):
        local = thd_partition_indices(batch.packed.cu_seqlens_padded, 2, rank)
        for k in seq[local][mask[local] > 0].unique().tolist():
            ranks_of.setdefault(k, set()).add(rank)
    assert ranks_of == {0: {1}, 4: {1}, 1: {0, 1}, 5: {0}, 2: {0}, 6: {0}, 3: {0, 1}, 7: {0, 1}}
    assert (batch.packed.cu_seqlens_padded.diff() % 4 == 0).all() and batch.packed.segment_ids[0, -1] == 8  # the tail
    reference = direct[0]["packed_unpacked"]
    _assert_same(direct[0]["packed_cp1"], reference, pairs=4)
    for rank in direct:
        _assert_same(rank["packed_cp2"], reference, pairs=4)
