"""The same weights and global batch give the same loss, metrics and gradients on every layout.

Reference weights are built once on one process and saved as a dist checkpoint; each layout
loads them (megatron-core reshards), takes one Adam step on the same global batch through the
real training loop, and saves. The checkpoints are read back as full tensors: Adam's first
moment after one step is (1 - beta1) x gradient, so comparing it compares the gradients
themselves; the parameters after the step are compared too, with the step's loss and metrics.
Layouts that share a world size run one after another in the same processes.
"""

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from simpo_megatron.testing import run_distributed, save_reference_weights, tiny_config

# name: (TP, PP, micro-batch size, distributed optimizer, layers per virtual pipeline stage
# [, other config fields]); global batch 4 pairs throughout.
BY_WORLD = {
    1: {"tp1pp1dp1_4mb": (1, 1, 1, False, None), "tp1pp1dp1_1mb": (1, 1, 4, False, None)},
    2: {
        "tp2": (2, 1, 2, False, None),
        "pp2": (1, 2, 2, False, None),
        # Micro-batches of 24 and 32 columns: stages exchange shapes (variable_seq_lengths).
        "pp2_4mb": (1, 2, 1, False, None),
        "pp2_vpp2": (1, 2, 1, False, 1),  # interleaved 1F1B, two model chunks per stage
        "dp2": (1, 1, 2, False, None),
        "dp2_distopt": (1, 1, 2, True, None),
        "tp2_chunked_head": (2, 1, 2, False, None, {"logprob_chunk_size": 7}),
        # Sequence parallelism on the local layers (their norms the local RMSNorm).
        "tp2_sp": (2, 1, 2, False, None, {"sequence_parallel": True}),
        "tp2_sp_chunked_head": (2, 1, 2, False, None, {"sequence_parallel": True, "logprob_chunk_size": 7}),
    },
    4: {"tp2pp2": (2, 2, 2, False, None)},
}
# Every layout again with --packing, at a budget of 2 x 2 x 32 tokens a micro-batch: the 4 pairs
# (40-43 tokens each) pack as 3 + 1 on one DP rank, 2 + 2 over two.
PACKED = {"packing": True}
for _layouts in BY_WORLD.values():
    for _name, (_tp, _pp, _mbs, _distopt, _vpp, *_extra) in list(_layouts.items()):
        if _name != "tp1pp1dp1_1mb":
            _layouts[f"{_name}_packed"] = (_tp, _pp, 2, _distopt, _vpp, {**(_extra[0] if _extra else {}), **PACKED})
BASELINE = "tp1pp1dp1_4mb"
# The loss variants, each through TP=2, PP=2 and DP=2 with the distributed optimizer (padded and
# packed) against its own single-process run, named "LAYOUT+VARIANT". Summed log-probs at a small
# beta keep the sigmoid away from saturation.
VARIANTS = {
    "summed_smoothed": (
        {"average_log_prob": False, "beta": 0.1, "label_smoothing": 0.2},
        ("tp2", "pp2_packed", "dp2_distopt"),
    ),
    "hinge": ({"loss_type": "hinge"}, ("tp2_packed", "pp2", "dp2_distopt_packed")),
}
for _variant, (_changes, _names) in VARIANTS.items():
    for _layouts in BY_WORLD.values():
        for _name in [BASELINE, *_names]:
            if _name in _layouts:
                *_fields, _extra = (*_layouts[_name], {})[:6]
                _layouts[f"{_name}+{_variant}"] = (*_fields, {**_extra, **_changes})


def _baseline(name: str) -> str:
    """The single-process run that ``name`` is compared with: the one of its loss variant."""
    return BASELINE + name[name.index("+") :] if "+" in name else BASELINE


def _config(tp, pp, mbs, **kw):
    return tiny_config(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        micro_batch_size=mbs,
        global_batch_size=4,
        lr=1e-3,
        clip_grad=0.0,
        lr_decay_style="constant",
        # A large epsilon keeps the first Adam update smooth in the gradient (lr * g / (|g| + eps)),
        # so layouts that differ by rounding do not flip the sign of near-zero updates.
        adam_eps=1e-2,
        train_iters=1,
        log_interval=1,
        **kw,
    )


def _run_layouts(layouts: dict, root: str, build_reference: bool):
    from megatron.core import parallel_state

    from simpo_megatron.training.loop import pretrain

    ref = os.path.join(root, "reference")
    if build_reference:
        cfg = _config(1, 1, 1)
        save_reference_weights(cfg, ref)
        parallel_state.destroy_model_parallel()
    summaries = {}
    for name, (tp, pp, mbs, distopt, vpp_layers, *extra) in layouts.items():
        cfg = _config(
            tp,
            pp,
            mbs,
            use_distributed_optimizer=distopt,
            load=ref,
            save=os.path.join(root, name),
            dist_ckpt_optim_fully_reshardable=distopt,
            num_layers_per_virtual_pipeline_stage=vpp_layers,
            **(extra[0] if extra else {}),
        )
        summaries[name] = pretrain(cfg)["train"]
        parallel_state.destroy_model_parallel()
    return summaries


def _full_tensors(ckpt_dir: str, flat_path: str) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(ckpt_dir, flat_path)
    return {k: v for k, v in torch.load(flat_path, weights_only=False).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    metrics = {}
    for world, layouts in BY_WORLD.items():
        metrics.update(run_distributed(_run_layouts, world, layouts, str(root), world == 1)[-1])
    tensors = {name: _full_tensors(str(root / name / "iter_0000001"), str(root / f"{name}.pt")) for name in metrics}
    reference = _full_tensors(str(root / "reference" / "iter_0000000"), str(root / "reference.pt"))
    return metrics, tensors, reference


METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "num_pairs",
    "grad_norm",
)


@pytest.mark.parametrize("name", [n for layouts in BY_WORLD.values() for n in layouts if n != _baseline(n)])
def test_same_loss_metrics_gradients_and_update(runs, name):
    metrics, tensors, reference = runs
    baseline = _baseline(name)
    base, mine = tensors[baseline], tensors[name]
    assert metrics[baseline]["num_pairs"] == 4
    for key in METRICS:
        assert metrics[name][key] == pytest.approx(metrics[baseline][key], rel=1e-5, abs=1e-6), key

    params = [k for k in base if not k.startswith("optimizer.")]
    first_moments = [k for k in base if k.startswith("optimizer.state.exp_avg.")]
    assert len(first_moments) == len(params) > 5
    assert set(mine) >= set(params) | set(first_moments)
    for key in first_moments:  # (1 - beta1) x gradient
        assert base[key].abs().max() > 0, key
        torch.testing.assert_close(mine[key], base[key], rtol=1e-4, atol=1e-7, msg=key)
    for key in params:
        assert not torch.equal(reference[key], base[key]), f"{key} did not move"
        torch.testing.assert_close(mine[key], base[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_loss_variants_change_the_run(runs):
    """Each variant's flags reach the loss: its single-process run differs from the default one."""
    metrics = runs[0]
    base, summed, hinge = (metrics[f"{BASELINE}{v}"] for v in ("", "+summed_smoothed", "+hinge"))
    assert summed["logps/chosen"] < 5 * base["logps/chosen"] < 0  # sums over the response tokens
    assert hinge["loss"] != pytest.approx(base["loss"], rel=1e-3)
